"""The report of benchmarks/efficacy.py: the side-by-side table and the learning-curve PNG."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table


def _f(v, d: int = 3, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{d}f}" if signed else f"{v:.{d}f}"


def _ci(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    """The mean, then its interval one digit shorter (a table cell that does not wrap)."""
    if not d:
        return "-"
    return f"{_f(d['mean'], digits, signed)} [{_f(d['low'], digits - 1, signed)}, {_f(d['high'], digits - 1, signed)}]"


def _wtl(wr: dict | None) -> str:
    if not wr:
        return "-"
    rate = wr.get("win_rate")
    return f"{wr['wins']}/{wr['ties']}/{wr['losses']}" + (f" ({rate['mean']:.2f})" if rate else "")


def side_by_side(final: dict, seeds: list[int], arms: dict) -> Table:
    """Metric rows; per seed online | offline | online vs offline columns, and the mean over seeds."""
    t = Table(title=f"online vs offline, same pair budget: {final['prompts']} held-out prompts, greedy, "
                    f"{final['max_tokens']} tokens",
              caption=escape("[a, b] = 95% bootstrap interval; W/T/L (win rate without ties) by the composite judge "
                             "asked in both orders; on vs off: online - offline (paired: the same prompts), "
                             "x = online / offline"))
    t.add_column("", no_wrap=True)
    t.add_column("base", justify="right")
    for s in seeds:
        for col in (f"s{s} online", f"s{s} offline", f"s{s} on vs off"):
            t.add_column(col, justify="right")
    t.add_column("mean over seeds", justify="right")
    by, base = final["by_seed"], final["base"]["signals"]

    def sig(s: int, arm: str, k: str):
        r = by[str(s)].get(arm)
        return r["signals"].get(k) if r else None

    def both(s: int, k: str):
        return sig(s, "online", k), sig(s, "offline", k)

    def add(name: str, cell, compare, mean_fmt, base_cell: str = "") -> None:
        """`cell(s, arm)` -> text; `compare(s)` -> (number or None, text)."""
        cells, values = [base_cell], []
        for s in seeds:
            value, text = compare(s)
            cells += [cell(s, "online"), cell(s, "offline"), text]
            values.append(value)
        values = [v for v in values if v is not None]
        t.add_row(name, *cells, mean_fmt(sum(values) / len(values)) if values else "-")

    def difference(k: str, d: int):
        def compare(s):
            a, b = both(s, k)
            return (None, "-") if a is None or b is None else (a - b, _f(a - b, d, True))
        return compare

    def ratio(k: str):
        def compare(s):
            a, b = both(s, k)
            return (None, "-") if a is None or not b else (a / b, f"x{a / b:.2f}")
        return compare

    def head(s: int) -> dict:
        return by[str(s)].get("head_to_head") or {}

    def version(s, arm):
        r = by[str(s)].get(arm)
        return f"v{r['version']} ({r['pairs']} pairs)" if r else "-"

    def gain(s, arm):
        v = sig(s, arm, "score")
        return None if v is None else v - base["score"]

    def gain_ratio(s):
        a, b = gain(s, "online"), gain(s, "offline")
        return (None, "-") if a is None or not b else (a / b, f"x{a / b:.2f}")

    def score_diff(s):
        d = head(s).get("score_difference")
        return (d["mean"], _ci(d, signed=True)) if d else (None, "-")

    def h2h(s):
        w = head(s).get("win_rate")
        return (w["win_rate"]["mean"] if w and w.get("win_rate") else None, "head to head " + _wtl(w) if w else "-")

    def wall(s, arm):
        v = (arms[s].get(arm) or {}).get("final_wall_s")
        return _f(v / 60 if v else None, 1)

    def wall_ratio(s):
        a, b = ((arms[s].get(x) or {}).get("final_wall_s") for x in ("online", "offline"))
        return (None, "-") if not a or not b else (a / b, f"x{a / b:.2f}")

    signed3, times = (lambda v: _f(v, 3, True)), (lambda v: f"x{v:.2f}")
    add("version (pairs trained)", version, lambda s: (None, ""), str, "v0 (0 pairs)")
    add("task score [95%]", lambda s, a: _ci(sig(s, a, "score_ci")), score_diff, signed3, _ci(base["score_ci"]))
    add("score gain over base", lambda s, a: _f(gain(s, a), 3, True), gain_ratio, times, "0")
    add("strict pass", lambda s, a: _f(sig(s, a, "strict_pass"), 2), difference("strict_pass", 2),
        lambda v: _f(v, 2, True), _f(base["strict_pass"], 2))
    add("vs base: W/T/L (win rate)", lambda s, a: _wtl((by[str(s)].get(a) or {}).get("win_rate_vs_base")), h2h,
        lambda v: f"online wins {v:.2f}")
    add("mean words", lambda s, a: _f(sig(s, a, "mean_words"), 1), ratio("mean_words"), times,
        _f(base["mean_words"], 1))
    for name, k, d in (("empty share", "empty_share", 2), ("distinct-2", "distinct2", 2),
                       ("on-topic share", "on_topic_share", 2), ("ref log-prob / token", "ref_logprob", 2),
                       ("guard pass", "guard_pass", 2)):
        add(name, lambda s, a, k=k, d=d: _f(sig(s, a, k), d), difference(k, d), lambda v, d=d: _f(v, d, True),
            _f(base[k], d))
    add("wall time to final (min)", wall, wall_ratio, times)
    return t


def plot_curves(arms: dict, base_sig: dict, curve_n: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out task score", "score"), ("on-topic share", "on_topic_share"), ("mean words", "mean_words"),
              ("reference log-prob / token", "ref_logprob")]
    fig, axes = plt.subplots(2, len(panels), figsize=(16, 7.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, (title, key) in enumerate(panels):
        for r, (xkey, xlabel, scale) in enumerate((("pairs", "pairs trained", 1), ("wall_s", "wall time (min)", 60))):
            ax = axes[r][col]
            for i, (seed, arm) in enumerate(sorted(arms.items())):
                for name, style, marker in (("online", "-", "o"), ("offline", "--", "s")):
                    curve = [p for p in (arm.get(name) or {}).get("curve", [])
                             if p.get(xkey) is not None and p["signals"] and p["signals"].get(key) is not None]
                    if curve:
                        ax.plot([p[xkey] / scale for p in curve], [p["signals"][key] for p in curve], style,
                                marker=marker, ms=4, color=colors[i % len(colors)], label=f"{name} s{seed}")
            if base_sig.get(key) is not None:
                ax.axhline(base_sig[key], color="gray", ls=":", lw=1, label="base")
            ax.set_xlabel(xlabel, fontsize="small")
            ax.set_title(title, fontsize="small")
            ax.tick_params(labelsize="small")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(f"online (solid) vs offline (dashed) DPO: first {curve_n} held-out prompts, greedy, same judge of "
                 f"answers; online points are the promotion gate's scores (versions it skipped: scored here)",
                 fontsize="medium")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


# -- the whole benchmark --------------------------------------------------------------------------------------

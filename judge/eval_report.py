"""How `odpo eval` shows its results: a table for the terminal, a JSON file, a PNG of the signals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from rich.markup import escape
from rich.table import Table

from judge.evaluate import ModelResult


def _ci(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not d:
        return "-"
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(d['mean'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def results_table(results: Sequence[ModelResult], title: str) -> Table:
    t = Table(title=title, caption=escape("[a, b] = 95% bootstrap interval; diff and W/T/L against the reference "
                                          "(same prompts; W/T/L by a judge asked in both orders)"))
    for col in ("model", "score", "strict", "diff vs ref", "W/T/L", "win rate", "words", "empty", "distinct-2",
                "on topic", "ref lp/tok", "guard ok"):
        t.add_column(col, justify="right", no_wrap=col in ("model",))
    for r in results:
        s, v = r.signals, r.versus
        wr = v.get("win_rate") or {}
        t.add_row(r.target.label + (f" ({r.served_version})" if r.served_version and r.served_version != r.target.model
                                    else ""),
                  _ci(s["score_ci"]), _num(s["strict_pass"], 2), _ci(v.get("score_difference"), signed=True) if v
                  else "reference", f"{wr['wins']}/{wr['ties']}/{wr['losses']}" if wr else "-",
                  _ci(wr.get("win_rate"), 2) if wr else "-", _num(s["mean_words"], 1), _num(s["empty_share"], 2),
                  _num(s["distinct2"], 2), _num(s["on_topic_share"], 2), _num(s["ref_logprob"], 2),
                  _num(s["guard_pass"], 2))
    return t


def examples(results: Sequence[ModelResult], prompts: Sequence, count: int) -> list[str]:
    """The first `count` prompts with every model's answer, for reading (numbers hide what text shows)."""
    lines = []
    for i in range(min(count, len(prompts))):
        p = prompts[i]
        text = p.messages[-1].content if p.messages else p.text
        lines.append(f"[{p.id}] {text}")
        for r in results:
            row = r.rows[i]
            flag = f", guard: {row.guard_failure}" if row.guard_failure else ""
            lines.append(f"  {r.target.label:>12} ({row.score:.2f}{flag}): {row.answer.strip()!r}")
    return lines


def write_json(results: Sequence[ModelResult], settings: dict, out: Path, suites: dict | None = None) -> Path:
    """eval.json: the settings, the bundled suite's models and, under `suites`, each public benchmark's results."""
    out.write_text(json.dumps({"settings": settings, "models": [r.as_dict() for r in results],
                               "suites": suites or {}}, indent=1))
    return out


def plot_results(results: Sequence[ModelResult], out: Path) -> Path:
    """One panel per signal, a bar per model (task score and win rate with their intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.target.label for r in results]
    panels = [("task score", "score", "score_ci"), ("strict pass", "strict_pass", "strict_pass_ci"),
              ("mean words", "mean_words", None), ("on-topic share", "on_topic_share", None),
              ("distinct-2", "distinct2", None), ("reference log-prob / token", "ref_logprob", "ref_logprob_ci")]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6), dpi=110)
    flat = list(axes.flat)
    for ax, (title, key, ci_key) in zip(flat, panels):
        values = [r.signals.get(key) or 0.0 for r in results]
        err = None
        if ci_key:
            cis = [r.signals.get(ci_key) for r in results]
            err = [[v - (c["low"] if c else v) for v, c in zip(values, cis)],
                   [(c["high"] if c else v) - v for v, c in zip(values, cis)]]
        ax.bar(labels, values, yerr=err, capsize=4, color="tab:blue")
        ax.set_title(title, fontsize="small")
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
    ax = flat[6]
    others = [r for r in results if r.versus.get("win_rate")]
    if others:
        names = [r.target.label for r in others]
        n = [r.versus["win_rate"]["n"] for r in others]
        wins = [r.versus["win_rate"]["wins"] / k for r, k in zip(others, n)]
        ties = [r.versus["win_rate"]["ties"] / k for r, k in zip(others, n)]
        losses = [r.versus["win_rate"]["losses"] / k for r, k in zip(others, n)]
        ax.bar(names, wins, color="tab:green", label="win")
        ax.bar(names, ties, bottom=wins, color="tab:gray", label="tie")
        ax.bar(names, losses, bottom=[w + t for w, t in zip(wins, ties)], color="tab:red", label="loss")
        ax.legend(fontsize="x-small")
        ax.set_title(f"vs {others[0].versus['reference']} (both orders)", fontsize="small")
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
    else:
        ax.axis("off")
    ax = flat[7]
    diffs = [(r.target.label, r.versus["score_difference"]) for r in results if r.versus.get("score_difference")]
    if diffs:
        ax.errorbar([d[1]["mean"] for d in diffs], range(len(diffs)),
                    xerr=[[d[1]["mean"] - d[1]["low"] for d in diffs], [d[1]["high"] - d[1]["mean"] for d in diffs]],
                    fmt="o", capsize=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(diffs)), [d[0] for d in diffs], fontsize="small")
        ax.set_title("paired score difference (95%)", fontsize="small")
    else:
        ax.axis("off")
    fig.suptitle("odpo eval: the same held-out prompts, greedy answers")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out

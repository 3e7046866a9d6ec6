"""What `odpo up` shows: the live table, one plain line per event, the final table and summary.

The versions and their held-out scores come from the gateway's admin API
(`/admin/versions`): the promotion gate scores `base` and every version, so
`odpo up` does not score anything itself. Counts come from the topics; restarts from the supervisor (`service.launcher`).
Lines that need someone's attention (stale pairs) start with `LOUD`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import httpx
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from service.loop_watch import LoopCounts, StaleState

DECIDED = ("passed", "refused", "superseded", "failed", "rolled_back")
LOUD = "!! "
# The gate's signals per version (judge/signals.py) carried into rows, summary.json and versions.png.
QUALITY_SIGNALS = ("score_ci", "strict_pass", "mean_words", "empty_share", "distinct2", "on_topic_share",
                   "ref_logprob", "guard_pass", "score_difference")


class GateAdmin:
    """Reads the gate's admin API with the token `odpo up` gave it."""

    def __init__(self, url: str, token: str):
        self.url, self.headers = url, {"authorization": f"Bearer {token}"}

    def versions(self) -> dict | None:
        try:
            resp = httpx.get(f"{self.url}/admin/versions", headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None


class PairRate:
    """Pairs per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 60):
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, pairs: int) -> float:
        now = time.monotonic()
        self._samples.append((now, pairs))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, p0 = self._samples[0]
        return (pairs - p0) / (now - t0) if now > t0 else 0.0


@dataclass
class EventLog:
    """Turns successive snapshots into one plain line per event (a version published, scored, promoted; most
    recent pairs stale, once per episode). Versions up to `skip_through` (a resumed run's) are not repeated."""

    seen: dict[tuple[int, str], bool] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    promoted: int | None = None
    skip_through: int = -1
    stale: bool = False

    def lines(self, counts: LoopCounts, view: dict | None) -> list[str]:
        out = self._stale_lines(counts.stale)
        for a in counts.adapters:
            if a.version > self.skip_through and a.version not in self.published:
                self.published.add(a.version)
                m = a.metrics
                out.append(f"v{a.version} published: {a.pairs_trained} pairs, loss {m.loss:.4f}, "
                           f"reward margin {m.reward_margin:.4f}, reward accuracy {m.reward_accuracy:.2f}")
        if view is None:
            return out
        for v in sorted(view["versions"], key=lambda v: v["version"]):
            key = (v["version"], v["status"])
            if v["status"] in DECIDED and key not in self.seen and v["version"] > self.skip_through:
                self.seen[key] = True
                score = f"held-out score {v['score']:.3f}" if v["score"] is not None else "not scored"
                sig = v.get("signals") or {}
                if sig.get("mean_words") is not None:
                    score += (f", {sig['mean_words']:.1f} words, on topic {_num(sig.get('on_topic_share'), 2)}, "
                              f"ref lp {_num(sig.get('ref_logprob'), 2)}, {sig.get('n', '?')} prompts")
                why = f": {v['reason']}" if v["reason"] else ""
                out.append(f"{v['name']} {v['status']} ({score}){why}")
        if view["promoted"] != self.promoted:
            if self.promoted is not None:
                out.append(f"promoted: {view['promoted_name']} (was {_name(self.promoted)})")
            self.promoted = view["promoted"]
        return out

    def _stale_lines(self, st: StaleState) -> list[str]:
        if st.alarm == self.stale:
            return []
        self.stale = st.alarm
        if st.alarm:
            return [LOUD + stale_text(st)]
        fresh = f"recent pairs are fresh again: {st.stale} of the last {st.window} were too old to be trained"
        return [fresh]


def stale_text(st: StaleState) -> str:
    return (f"most recent pairs are stale: {st.stale} of the last {st.window} were sampled by v{st.sampled_by} "
            f"while the trainer is at v{st.newest} (max staleness {st.max_staleness}) — the generator is behind "
            "(pairs are dropped, not trained)")


def restarts_text(restarts: dict[str, int] | None) -> str:
    """`trainer 2, broker 1`, or `none`."""
    done = {k: v for k, v in (restarts or {}).items() if v}
    return ", ".join(f"{k} {v}" for k, v in done.items()) or "none"


def progress_table(c: LoopCounts, view: dict | None, sent: int, rate: float, elapsed: float,
                   rounds: int | None, restarts: dict[str, int] | None = None,
                   dropped_stale: int | None = None) -> Group:
    promoted = view["promoted_name"] if view else "-"
    title = f"odpo up · {elapsed:,.0f}s · policy = {promoted}" + (f" · until version {rounds}" if rounds else "")
    rows = version_rows(view, c)
    dropped = f" · dropped as stale {dropped_stale}" if dropped_stale else ""
    caption = (f"prompts sent {sent} · candidate sets {c.candidate_sets} · pairs {c.pairs} ({rate:.2f}/s){dropped}"
               f" · dead letters {c.dead_letters} · restarts {restarts_text(restarts)} · * promoted")
    parts = [versions_table(rows, title, caption), quality_table(rows)]
    if c.stale.alarm:
        parts.append(Text(LOUD + stale_text(c.stale), style="bold red"))
    return Group(*parts)


def versions_table(rows: list[dict], title: str, caption: str) -> Table:
    t = Table(title=title, caption=caption)
    # Short headers so the table fits 80 columns (a log file): score = held-out score, margin/acc = the
    # trainer's DPO reward margin and accuracy on the version's window.
    for col in ("version", "status", "score", "pairs", "loss", "margin", "acc"):
        t.add_column(col, justify="right", no_wrap=True)
    for v in rows:
        t.add_row(v["name"] + (" *" if v["promoted"] else ""), v["status"], _num(v["score"], 3),
                  _num(v["pairs_trained"], 0), _num(v["loss"], 4), _num(v["reward_margin"], 4),
                  _num(v["reward_accuracy"], 2))
    return t


SHORT_SIGNAL = {"mean_words": "words", "on_topic_share": "topic", "ref_logprob": "ref lp", "empty_share": "empty",
                "distinct2": "dist-2", "guard_pass": "guard", "": ""}


def quality_table(rows: list[dict], title: str = "what clients get: held-out answers per version") -> Table:
    """The gate's quality signals per version, so a policy that games its judge is visibly wrong."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True,
              show_edge=False,
              caption="score +- half its 95% interval; strict = every constraint met; topic = names its topic; "
                      "ref lp = base model log-prob/token (fluency); n = prompts; why = what refused it")
    for col in ("version", "score", "strict", "words", "dist-2", "topic", "ref lp", "n", "why"):
        t.add_column(col, justify="right", no_wrap=True)
    for v in rows:
        if v["score"] is None:
            continue
        ci = v.get("score_ci")
        score = _num(v["score"], 3) + (f"±{(ci['high'] - ci['low']) / 2:.2f}" if ci else "")
        t.add_row(v["name"] + (" *" if v["promoted"] else ""), score, _num(v.get("strict_pass"), 2),
                  _num(v.get("mean_words"), 1), _num(v.get("distinct2"), 2),
                  _num(v.get("on_topic_share"), 2), _num(v.get("ref_logprob"), 2),
                  _num(v.get("prompts_scored"), 0), SHORT_SIGNAL.get(v.get("refused_by") or "", v.get("refused_by")))
    return t


def version_rows(view: dict | None, c: LoopCounts) -> list[dict]:
    """One row per version, oldest first: the gate's records joined with the trainer's metrics."""
    published = {a.version: a for a in c.adapters}
    records = {v["version"]: v for v in (view or {}).get("versions", [])}
    rows = []
    for version in sorted(set(published) | set(records) | {0}):
        rec, ready = records.get(version, {}), published.get(version)
        metrics = ready.metrics.model_dump() if ready else rec.get("train_metrics") or {}
        signals = rec.get("signals") or {}
        rows.append({"version": version, "name": _name(version), "status": rec.get("status", "pending"),
                     "score": rec.get("score"), "promoted": bool(rec.get("promoted")),
                     "pairs_trained": ready.pairs_trained if ready else rec.get("pairs_trained"),
                     "loss": metrics.get("loss"), "reward_margin": metrics.get("reward_margin"),
                     "reward_accuracy": metrics.get("reward_accuracy"), "reason": rec.get("reason", ""),
                     "refused_by": rec.get("refused_by", ""), "prompts_scored": rec.get("prompts_scored"),
                     **{k: signals.get(k) for k in QUALITY_SIGNALS}})
    return rows


def decided_through(view: dict | None, rounds: int) -> bool:
    """True once the gate has given a verdict (scored, not only superseded) on version `rounds` or a newer one,
    and scored base: the run then ends with a version of at least that many rounds judged on its answers."""
    if not view:
        return False
    by_version = {v["version"]: v for v in view["versions"]}
    base_scored = by_version.get(0, {}).get("score") is not None
    return base_scored and any(v >= rounds and r["status"] in DECIDED and r["status"] != "superseded"
                               for v, r in by_version.items())


def summary(c: LoopCounts, view: dict | None, sent: int, elapsed: float, restarts: dict[str, int] | None = None,
            resumed_from: int | None = None, dropped_stale: int | None = None) -> dict:
    """What a run leaves in summary.json; counts are this run's (a resumed run's versions include the earlier
    ones the gate decided on, `resumed_from` says where this run started)."""
    rows = version_rows(view, c)
    scored = [r for r in rows if r["score"] is not None]
    promoted = next((r for r in rows if r["promoted"]), None)
    base, last = (rows[0] if rows else {}), (promoted or {})
    return {
        "quality": {k: {"base": base.get(k), "promoted": last.get(k)} for k in
                    ("mean_words", "on_topic_share", "ref_logprob", "strict_pass", "distinct2", "empty_share")},
        "refused": {r["name"]: r["refused_by"] for r in rows if r["status"] == "refused"},
        "elapsed_s": round(elapsed, 1),
        "prompts_sent": sent,
        "candidate_sets": c.candidate_sets,
        "pairs": c.pairs,
        "dead_letters": c.dead_letters,
        "restarts": dict(restarts or {}),
        "resumed_from": resumed_from,
        "stale": {"pairs_dropped_by_trainer": dropped_stale, "pairs_seen_stale": c.stale.seen_stale,
                  "episodes": c.stale.episodes, "alarm_at_end": c.stale.alarm,
                  "recent": {"stale": c.stale.stale, "window": c.stale.window, "newest_version": c.stale.newest,
                             "max_staleness": c.stale.max_staleness}},
        "versions": rows,
        "heldout": {"base": rows[0]["score"] if rows else None,
                    "promoted_version": promoted["version"] if promoted else None,
                    "promoted": promoted["score"] if promoted else None,
                    "best_version": max(scored, key=lambda r: r["score"])["version"] if scored else None},
    }


def summary_tables(s: dict) -> list[Table]:
    return [summary_table(s), quality_table(s["versions"])]


def summary_table(s: dict) -> Table:
    h = s["heldout"]
    promoted = _name(h["promoted_version"]) if h["promoted_version"] is not None else "-"
    q = s.get("quality", {})

    def pair(k, d):
        v = q.get(k) or {}
        return f"{_num(v.get('base'), d)} -> {_num(v.get('promoted'), d)}"

    restarts = s.get("restarts") or {}
    extra = f"; restarts: {restarts_text(restarts)}" if any(restarts.values()) else ""
    stale = (s.get("stale") or {}).get("pairs_dropped_by_trainer")
    extra += f"; pairs dropped as stale: {stale}" if stale else ""
    return versions_table(s["versions"], f"odpo up: {len(s['versions']) - 1} version(s) in {s['elapsed_s']:.0f}s",
                          f"* promoted. Base -> {promoted}: held-out score {_num(h['base'], 3)} -> "
                          f"{_num(h['promoted'], 3)}; words {pair('mean_words', 1)}; on topic "
                          f"{pair('on_topic_share', 2)}; ref lp {pair('ref_logprob', 2)}{extra}")


def _name(version: int) -> str:
    return "base" if version == 0 else f"policy-v{version}"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

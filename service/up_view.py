"""What `odpo up` shows: the live table, one plain line per event, the final table and summary.

The versions and their held-out scores come from the gateway's admin API
(`/admin/versions`): the promotion gate scores `base` and every version, so
`odpo up` does not score anything itself. Counts come from the topics.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import httpx
from rich.table import Table

from service.loop_watch import LoopCounts

DECIDED = ("passed", "refused", "superseded", "failed", "rolled_back")


class GatewayAdmin:
    """Reads the gateway's admin API with the token `odpo up` gave it."""

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
    """Turns successive snapshots into one plain line per event (a version published, scored, promoted)."""

    seen: dict[tuple[int, str], bool] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    promoted: int | None = None

    def lines(self, counts: LoopCounts, view: dict | None) -> list[str]:
        out = []
        for a in counts.adapters:
            if a.version not in self.published:
                self.published.add(a.version)
                m = a.metrics
                out.append(f"v{a.version} published: {a.pairs_trained} pairs, loss {m.loss:.4f}, "
                           f"reward margin {m.reward_margin:.4f}, reward accuracy {m.reward_accuracy:.2f}")
        if view is None:
            return out
        for v in sorted(view["versions"], key=lambda v: v["version"]):
            key = (v["version"], v["status"])
            if v["status"] in DECIDED and key not in self.seen:
                self.seen[key] = True
                score = f"held-out score {v['score']:.3f}" if v["score"] is not None else "not scored"
                why = f": {v['reason']}" if v["reason"] else ""
                out.append(f"{v['name']} {v['status']} ({score}){why}")
        if view["promoted"] != self.promoted:
            if self.promoted is not None:
                out.append(f"promoted: {view['promoted_name']} (was {_name(self.promoted)})")
            self.promoted = view["promoted"]
        return out


def progress_table(c: LoopCounts, view: dict | None, sent: int, rate: float, elapsed: float,
                   rounds: int | None) -> Table:
    promoted = view["promoted_name"] if view else "-"
    title = f"odpo up · {elapsed:,.0f}s · policy = {promoted}" + (f" · until version {rounds}" if rounds else "")
    return versions_table(version_rows(view, c), title,
                          f"prompts sent {sent} · candidate sets {c.candidate_sets} · pairs {c.pairs} "
                          f"({rate:.2f}/s) · dead letters {c.dead_letters} · * promoted")


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


def version_rows(view: dict | None, c: LoopCounts) -> list[dict]:
    """One row per version, oldest first: the gate's records joined with the trainer's metrics."""
    published = {a.version: a for a in c.adapters}
    records = {v["version"]: v for v in (view or {}).get("versions", [])}
    rows = []
    for version in sorted(set(published) | set(records) | {0}):
        rec, ready = records.get(version, {}), published.get(version)
        metrics = ready.metrics.model_dump() if ready else rec.get("train_metrics") or {}
        rows.append({"version": version, "name": _name(version), "status": rec.get("status", "pending"),
                     "score": rec.get("score"), "promoted": bool(rec.get("promoted")),
                     "pairs_trained": ready.pairs_trained if ready else rec.get("pairs_trained"),
                     "loss": metrics.get("loss"), "reward_margin": metrics.get("reward_margin"),
                     "reward_accuracy": metrics.get("reward_accuracy"), "reason": rec.get("reason", "")})
    return rows


def decided_through(view: dict | None, rounds: int) -> bool:
    """True once the gate has decided on version `rounds` or a newer one (and scored base)."""
    if not view:
        return False
    by_version = {v["version"]: v for v in view["versions"]}
    base_scored = by_version.get(0, {}).get("score") is not None
    return base_scored and any(v >= rounds and r["status"] in DECIDED for v, r in by_version.items())


def summary(c: LoopCounts, view: dict | None, sent: int, elapsed: float) -> dict:
    rows = version_rows(view, c)
    scored = [r for r in rows if r["score"] is not None]
    promoted = next((r for r in rows if r["promoted"]), None)
    return {
        "elapsed_s": round(elapsed, 1),
        "prompts_sent": sent,
        "candidate_sets": c.candidate_sets,
        "pairs": c.pairs,
        "dead_letters": c.dead_letters,
        "versions": rows,
        "heldout": {"base": rows[0]["score"] if rows else None,
                    "promoted_version": promoted["version"] if promoted else None,
                    "promoted": promoted["score"] if promoted else None,
                    "best_version": max(scored, key=lambda r: r["score"])["version"] if scored else None},
    }


def summary_table(s: dict) -> Table:
    h = s["heldout"]
    promoted = _name(h["promoted_version"]) if h["promoted_version"] is not None else "-"
    return versions_table(s["versions"], f"odpo up: {len(s['versions']) - 1} version(s) in {s['elapsed_s']:.0f}s",
                          f"* promoted. Held-out score: base {_num(h['base'], 3)} -> {promoted} "
                          f"{_num(h['promoted'], 3)}")


def _name(version: int) -> str:
    return "base" if version == 0 else f"policy-v{version}"


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

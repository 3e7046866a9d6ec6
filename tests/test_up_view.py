"""What `odpo up` prints and plots, from a real VersionBook's admin view (no processes)."""

from __future__ import annotations

from rich.console import Console

from core.contracts import AdapterReady, TrainMetrics
from service.registry.book import VersionBook
from service.loop_watch import LoopCounts
from service.up_plot import plot_versions
from service.up_view import EventLog, PairRate, decided_through, summary, summary_table


def _ready(v: int, margin: float) -> AdapterReady:
    return AdapterReady(version=v, path=f"policy-v{v}", sha256="0" * 64, base_model="m", parent_version=v - 1,
                        pairs_trained=8 * v, metrics=TrainMetrics(loss=0.6, reward_margin=margin,
                                                                  reward_accuracy=0.75, steps=4))


def test_events_summary_and_plot(tmp_path):
    book = VersionBook(tolerance=0.02)
    counts = LoopCounts(pairs=30, candidate_sets=20)
    events = EventLog()
    assert events.lines(counts, None) == []
    book.next_evaluation()
    book.decide(0, 0.50)
    assert events.lines(counts, book.snapshot()) == ["base passed (held-out score 0.500)"]
    assert not decided_through(book.snapshot(), 1)

    for v, score in ((1, 0.55), (2, 0.40)):
        counts.adapters.append(_ready(v, 0.1 * v))
        book.add(counts.adapters[-1])
        book.next_evaluation()
        book.decide(v, score)
    lines = events.lines(counts, book.snapshot())
    assert lines[0].startswith("v1 published: 8 pairs, loss 0.6000, reward margin 0.1000")
    assert "policy-v1 passed (held-out score 0.550)" in lines
    refused = "policy-v2 refused (held-out score 0.400): held-out score 0.4000 is below"
    assert any(line.startswith(refused) for line in lines)
    assert lines[-1] == "promoted: policy-v1 (was base)"
    assert events.lines(counts, book.snapshot()) == [], "each event is printed once"
    assert decided_through(book.snapshot(), 2)

    s = summary(counts, book.snapshot(), sent=40, elapsed=12.0)
    assert [(r["name"], r["status"], r["promoted"]) for r in s["versions"]] == [
        ("base", "passed", False), ("policy-v1", "passed", True), ("policy-v2", "refused", False)]
    assert s["heldout"] == {"base": 0.5, "promoted_version": 1, "promoted": 0.55, "best_version": 1}
    console = Console(width=80, record=True)
    console.print(summary_table(s))
    text = console.export_text()
    assert "policy-v2" in text and "refused" in text and "0.550" in text and "…" not in text, text

    png = plot_versions(s["versions"], tmp_path / "versions.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_pair_rate():
    rate = PairRate(window_s=60)
    assert rate.update(0) == 0.0
    assert rate.update(10) > 0

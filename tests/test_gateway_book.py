"""The gateway's bookkeeping without I/O: promotion rules, pin, rollback, kept responses, stream reading."""

from __future__ import annotations

import json

import pytest

from core.contracts import AdapterReady, PromptEvent, TrainMetrics
from service.registry.book import BookError, VersionBook
from service.gate.metrics import HELDOUT_SCORE, ScoreGauge
from service.gateway.served import ServedChoice, ServedStore, StreamTap, served_choices

SHA = "0" * 64


def ready(version: int) -> AdapterReady:
    metrics = TrainMetrics(loss=0.6, reward_margin=0.3, reward_accuracy=0.7, steps=2)
    return AdapterReady(version=version, path=f"policy-v{version}", sha256=SHA, base_model="m", parent_version=0,
                        pairs_trained=8, metrics=metrics)


def scored_base(score: float = 0.5, tolerance: float = 0.05) -> VersionBook:
    book = VersionBook(tolerance)
    assert book.next_evaluation() == (0, [])  # base is scored first
    decision = book.decide(0, score)
    assert not decision.promoted and book.promoted == 0 and book.record(0).score == score
    return book


def test_base_is_scored_before_anything_else():
    book = VersionBook(0.05)
    book.add(ready(1))
    assert book.next_evaluation() == (0, [])
    book.decide(0, 0.5)
    assert book.next_evaluation() == (1, [])
    assert book.next_evaluation() == (None, [])  # 1 is being evaluated, nothing else pending


def test_base_keeps_its_quality_signals_though_no_verdict_decides_it():
    """`odpo up`'s table and plot showed "-" for base's length, topic and fluency: nothing kept them."""
    book = VersionBook(0.05)
    book.next_evaluation()
    signals = {"score": 0.5, "mean_words": 23.9, "on_topic_share": 0.75, "ref_logprob": -0.87}
    book.decide(0, 0.5, None, [{"prompt_id": "heldout-0000"}], signals)
    assert book.record(0).signals == signals and book.record(0).status == "passed"


@pytest.mark.parametrize("score, promoted, status", [(0.6, True, "passed"), (0.46, True, "passed"),
                                                     (0.449, False, "refused"), (0.1, False, "refused")])
def test_promotion_within_the_tolerance(score, promoted, status):
    book = scored_base(0.5, tolerance=0.05)
    book.add(ready(1))
    assert book.next_evaluation() == (1, [])
    d = book.decide(1, score)
    assert (d.promoted, d.status, book.promoted) == (promoted, status, 1 if promoted else 0)
    if not promoted:
        assert "below base's 0.5000 by more than the tolerance 0.05" in d.reason


def test_newest_pending_version_supersedes_older_ones():
    book = scored_base()
    for v in (1, 2, 3):
        assert book.add(ready(v))
    assert not book.add(ready(2)), "a version is recorded once"
    assert book.next_evaluation() == (3, [1, 2])
    assert [book.record(v).status for v in (1, 2, 3)] == ["superseded", "superseded", "evaluating"]


def test_versions_a_failed_one_superseded_wait_again():
    book = scored_base()
    for v in (1, 2, 3):
        book.add(ready(v))
    assert book.next_evaluation() == (3, [1, 2])
    book.decide(3, 0.6)
    book.add(ready(4))
    assert book.next_evaluation() == (4, [])
    assert book.fail(4, "cannot be served: sha256 mismatch") == [], "1 and 2 were superseded by 3, which was scored"
    for v in (5, 6):
        book.add(ready(v))
    assert book.next_evaluation() == (6, [5])
    assert book.fail(6, "cannot be served: sha256 mismatch") == [5]
    assert (book.record(5).status, book.record(5).reason, book.record(5).superseded_by) == ("pending", "", None)
    assert book.next_evaluation() == (5, [])
    assert [book.record(v).status for v in (1, 2, 6)] == ["superseded", "superseded", "failed"]
    restored = VersionBook(0.05)
    restored.restore_state(json.loads(json.dumps(book.export_state())))
    assert restored.record(1).superseded_by == 3 and restored.newest() == 6


def test_pin_holds_traffic_and_unpin_releases_it():
    book = scored_base()
    book.pin()
    book.add(ready(1))
    book.next_evaluation()
    d = book.decide(1, 0.9)
    assert not d.promoted and d.status == "passed" and "pinned to base" in d.reason and book.promoted == 0
    book.unpin()
    book.add(ready(2))
    book.next_evaluation()
    assert book.decide(2, 0.9).promoted and book.promoted == 2
    book.pin(1)
    assert book.promoted == 1 and book.pinned


def test_rollback_walks_back_through_promotions():
    book = scored_base()
    for v in (1, 2):
        book.add(ready(v))
        book.next_evaluation()
        book.decide(v, 0.5)
    assert book.promoted == 2 and book.snapshot()["history"] == [0, 1, 2]
    assert book.rollback() == (2, 1)
    assert book.record(2).status == "rolled_back" and book.promoted == 1
    assert book.rollback() == (1, 0)
    with pytest.raises(BookError, match="nothing to roll back"):
        book.rollback()


def test_operator_may_promote_a_refused_version_and_roll_it_back():
    book = scored_base(0.5)
    book.add(ready(1))
    book.next_evaluation()
    assert book.decide(1, 0.0).status == "refused"
    assert book.promote(1) == 0 and book.promoted == 1
    assert book.rollback() == (1, 0)
    with pytest.raises(BookError) as err:
        book.promote(7)
    assert err.value.status == 404


def test_an_unscored_promoted_version_is_scored_next():
    book = scored_base()
    book.add(ready(4))
    book.promote(4)  # an operator promoted it before the gate got to it
    assert book.next_evaluation() == (4, [])
    assert book.decide(4, 0.7).status == "passed" and book.promoted == 4


def test_failed_and_requeued_versions():
    book = scored_base()
    book.add(ready(1))
    book.next_evaluation()
    book.requeue(1)
    assert book.record(1).status == "pending" and book.next_evaluation() == (1, [])
    book.fail(1, "cannot be served: sha256 mismatch")
    assert book.record(1).status == "failed" and book.promoted == 0 and book.next_evaluation() == (None, [])


def test_records_are_bounded_but_promoted_history_is_kept():
    book = VersionBook(0.05, max_records=5)
    book.next_evaluation()
    book.decide(0, 0.5)
    book.add(ready(1))
    book.promote(1)
    for v in range(2, 12):
        book.add(ready(v))
    kept = {r["version"] for r in book.snapshot()["versions"]}
    assert len(kept) == 5 and {0, 1, 11} <= kept


def test_score_gauge_keeps_the_newest_versions():
    gauge = ScoreGauge(keep=2)
    for v, s in ((901, 0.1), (902, 0.2), (903, 0.3)):
        gauge.set(v, s)
    labels = {s.labels["policy_version"] for m in HELDOUT_SCORE.collect() for s in m.samples}
    assert {"902", "903"} <= labels and "901" not in labels


def _choice(text: str) -> ServedChoice:
    return ServedChoice(PromptEvent(id="p", text="hi"), text, 0)


def test_served_store_is_an_lru_with_choice_ids():
    store = ServedStore(capacity=2)
    store.put("a", [_choice("a0"), _choice("a1")])
    store.put("b", [_choice("b0")])
    assert store.get("a").text == "a0" and store.get("a:1").text == "a1" and store.get("a:0").text == "a0"
    assert store.get("a:2") is None
    store.put("c", [_choice("c0")])
    assert store.get("a") is None and store.get("b").text == "b0" and len(store) == 2


def test_stream_tap_reads_split_sse_chunks():
    events = [{"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "Hel"}},
                                               {"index": 1, "delta": {"content": "Yo"}}]},
              {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    tap = StreamTap(chat=True)
    for i in range(0, len(raw), 7):  # chunk boundaries fall inside lines
        assert not tap.done, "the answer is complete only with [DONE]"
        tap.feed(raw[i:i + 7])
    assert tap.response_id == "chatcmpl-1" and tap.texts() == {0: "Hello", 1: "Yo"} and tap.done


def test_batched_prompts_map_choices_to_their_prompt():
    p = [PromptEvent(id="x-0", text="one"), PromptEvent(id="x-1", text="two")]
    out = served_choices({0: "a", 1: "b", 2: "c", 3: "d"}, p, per_prompt=2, version=3)
    assert [c.prompt.text for c in out] == ["one", "one", "two", "two"] and out[3].policy_version == 3

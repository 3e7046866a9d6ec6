"""The policy registry survives a gate restart: scores, promotions, pin and rollback history, from a real file."""

from __future__ import annotations

import json

from service.registry.book import VersionBook
from service.gate.registry_file import RegistryFile
from tests.test_gateway_book import ready

EVAL = {"heldout_prompts": 24, "eval_max_tokens": 48}


def book_changes(book: VersionBook) -> VersionBook:
    """base scored; v1 promoted by the gate; v2 refused; v3 being scored; rolled back to base and pinned."""
    assert book.next_evaluation() == (0, [])
    book.decide(0, 0.5)
    for v in (1, 2, 3):
        book.add(ready(v))
        assert book.next_evaluation() == (v, [])
        if v < 3:
            book.decide(v, {1: 0.6, 2: 0.1}[v])
    assert book.promoted == 1 and book.record(2).status == "refused" and book.evaluating == 3
    assert book.rollback() == (1, 0)
    book.pin()
    return book


def a_book_with_history() -> VersionBook:
    return book_changes(VersionBook(0.05))


def test_every_change_is_saved_and_a_new_book_restores_it(tmp_path):
    path = tmp_path / "store" / "gate-registry.json"
    book = VersionBook(0.05)
    assert RegistryFile(path, EVAL).attach(book) is False  # no file yet: the empty book is saved at once
    assert json.loads(path.read_text())["promoted"] == 0
    book_changes(book)  # the gate's steps and the operator's actions, each saved as it happens
    book.unpin()  # the last change reaches the file too

    restored = VersionBook(0.05)
    assert RegistryFile(path, EVAL).attach(restored) is True
    assert (restored.promoted, restored.pinned) == (0, False)
    assert restored.snapshot()["history"] == [0]
    for v, status, score in [(0, "passed", 0.5), (1, "rolled_back", 0.6), (2, "refused", 0.1), (3, "pending", None)]:
        rec = restored.record(v)
        assert (rec.status, rec.score) == (status, score), v
        assert rec.train_metrics == book.record(v).train_metrics
    assert restored.next_evaluation() == (3, []), "the version cut off mid-evaluation is scored again"
    assert not list(path.parent.glob(".*.tmp-*")), "no temporary file is left behind"


def test_scores_from_another_evaluation_are_dropped_and_base_is_scored_again(tmp_path):
    path = tmp_path / "gate-registry.json"
    RegistryFile(path, EVAL).attach(a_book_with_history())
    restored = VersionBook(0.05)
    RegistryFile(path, {**EVAL, "heldout_prompts": 8}).attach(restored)
    assert (restored.promoted, restored.pinned) == (0, True)
    assert [restored.record(v).score for v in (0, 1, 2)] == [None, None, None]
    assert restored.record(2).status == "refused", "verdicts stay; only the numbers are not comparable"
    assert restored.next_evaluation() == (0, []), "the promoted version is scored before anything else"


def test_an_unreadable_file_is_set_aside_and_the_gateway_starts_fresh(tmp_path):
    path = tmp_path / "gate-registry.json"
    for content in ("{not json", json.dumps({"format": 99}), json.dumps({"format": 1, "promoted": 5, "records": []})):
        path.write_text(content)
        book = VersionBook(0.05)
        assert RegistryFile(path, EVAL).attach(book) is False
        assert book.promoted == 0 and book.record(0) is not None
        assert (tmp_path / "gate-registry.json.unreadable").read_text() == content
        assert json.loads(path.read_text())["promoted"] == 0, "a fresh registry is written in its place"


def test_only_real_changes_are_saved():
    """The gate polls `next_evaluation` and re-reads every AdapterReady after a restart: those write nothing."""
    book, calls = VersionBook(0.05), []
    book.on_change = lambda: calls.append(1)
    assert book.next_evaluation() == (0, []) and len(calls) == 1
    book.decide(0, 0.5)
    book.add(ready(1))
    assert len(calls) == 3
    assert book.add(ready(1)) is False
    book.next_evaluation()  # v1 is being scored
    assert book.next_evaluation() == (None, [])
    assert len(calls) == 4, "a known version and an idle poll are no change"

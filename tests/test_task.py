"""The bundled constraints task: deterministic, well formed, train and held-out disjoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from judge import verifier
from core.contracts import PromptEvent
from service.task import (
    BULLET_MIN_WORDS,
    CONSTRAINT_TYPES,
    HELDOUT_TOPICS,
    SOURCE,
    SUBSTANCE_TYPES,
    TOPIC_WORDS,
    TRAIN_TOPICS,
    describe,
    make_prompts,
    state,
)

REPO = Path(__file__).resolve().parents[1]


def _dump(prompts: list[PromptEvent]) -> list[dict]:
    return [p.model_dump() for p in prompts]


def test_same_seed_same_prompts_and_prefix_stable():
    a = make_prompts("train", 40, seed=3)
    assert _dump(a) == _dump(make_prompts("train", 40, seed=3))
    assert _dump(make_prompts("train", 10, seed=3)) == _dump(a[:10])
    assert _dump(a) != _dump(make_prompts("train", 40, seed=4))


def test_same_prompts_in_a_fresh_interpreter_with_another_hash_seed():
    """Nothing may depend on str hashing (PYTHONHASHSEED) or on process state."""
    code = "from service.task import make_prompts; print([p.model_dump_json() for p in make_prompts('heldout', 12, 1)])"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=REPO, env={"PYTHONHASHSEED": h, "PATH": ""}).stdout for h in ("1", "2")]
    assert outs[0] == outs[1]
    assert outs[0].strip() == str([p.model_dump_json() for p in make_prompts("heldout", 12, 1)])


def test_train_and_heldout_are_disjoint():
    train, held = make_prompts("train", 60), make_prompts("heldout", 30)
    assert not set(TRAIN_TOPICS) & set(HELDOUT_TOPICS)
    assert {p.task["topic"] for p in train} == set(TRAIN_TOPICS)  # 60 prompts go round all 24 topics
    assert {p.task["topic"] for p in held} == set(HELDOUT_TOPICS)
    assert not {p.id for p in train} & {p.id for p in held}
    assert not {p.messages[0].content for p in train} & {p.messages[0].content for p in held}
    for p in held:
        assert not any(t in p.messages[0].content for t in TRAIN_TOPICS if t not in p.task["topic"])


def test_prompts_are_well_formed():
    prompts = make_prompts("train", 200) + make_prompts("heldout", 100)
    seen_types = set()
    for i, p in enumerate(prompts[:200]):
        assert p.id == f"train-{i:04d}"
    for p in prompts:
        assert p.source == SOURCE
        assert len(p.messages) == 1 and p.messages[0].role == "user"
        text, cs = p.messages[0].content, p.task["constraints"]
        assert p.task["kind"] == "constraints"
        assert 2 <= len(cs) <= 5  # 1 to 3 drawn, min_words beside max_words, on_topic always
        types = [c["type"] for c in cs]
        assert len(set(types)) == len(types)
        assert not {"bullet_points", "end_with"} <= set(types)
        assert ("max_words" in types) == ("min_words" in types)  # a limit never comes without a floor
        assert types[-1] == "on_topic" and cs[-1]["words"] == list(TOPIC_WORDS[p.task["topic"]])
        seen_types.update(types)
        verifier.parse_constraints(p.task)  # the judge accepts every generated task
        assert text.endswith(state(cs)) and state(cs) in text  # every stated constraint is in the user turn
        by_type = {c["type"]: c for c in cs}
        for c in cs:
            if c["type"] == "max_words":
                lo, hi = by_type["min_words"]["n"], c["n"]
                assert f"Use between {lo} and {hi} words." in text  # the range as one sentence
                assert describe(c) not in text and describe(by_type["min_words"]) not in text
                assert (15 if "bullet_points" in by_type else 12) <= hi <= 30
                assert lo == max(4, hi // 3) and 2 * lo <= hi  # room for an answer between the two
            elif c["type"] == "on_topic":
                assert describe(c) == ""  # stated by the instruction, which names the topic
                assert p.task["topic"] in text
            elif c["type"] != "min_words":
                assert describe(c) in text  # each other constraint is stated in the user turn
            if c["type"] == "bullet_points":
                assert 2 <= c["n"] <= 4 and c["min_words"] == BULLET_MIN_WORDS
                assert f"at least {BULLET_MIN_WORDS} words" in text
                if "max_words" in by_type:  # n bullets of BULLET_MIN_WORDS words fit under the limit
                    assert c["n"] * BULLET_MIN_WORDS <= by_type["max_words"]["n"]
            if c["type"] in ("include_word", "end_with"):
                value = c.get("word") or c.get("phrase")
                assert value == value.lower()  # satisfiable together with `lowercase`
                assert not set(verifier.words(value)) & set(cs[-1]["words"])  # it names no topic word
        assert len(text.split()) < 45  # short prompts for a 135M model
        PromptEvent.from_bytes(p.to_bytes())  # survives the wire
    assert seen_types == set(CONSTRAINT_TYPES) | set(SUBSTANCE_TYPES)


def test_state_reads_a_word_range_as_one_sentence():
    assert state([{"type": "max_words", "n": 20}, {"type": "min_words", "n": 6}, {"type": "no_commas"}]) == \
        "Use between 6 and 20 words. Do not use any commas."
    assert state([{"type": "max_words", "n": 20}]) == "Use at most 20 words."
    assert state([{"type": "min_words", "n": 6}]) == "Use at least 6 words."
    assert state([{"type": "on_topic", "words": ["sea"]}, {"type": "lowercase"}]) == "Write only in lowercase letters."
    assert describe({"type": "bullet_points", "n": 2}) == \
        'Answer with exactly 2 bullet points, each on its own line starting with "- ".'
    assert describe({"type": "bullet_points", "n": 2, "min_words": 3}) == (
        'Answer with exactly 2 bullet points, each a short sentence of at least 3 words on its own line '
        'starting with "- ".')


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_prompts("test", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_prompts("train", -1)
    assert make_prompts("train", 0) == []

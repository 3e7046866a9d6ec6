"""The verifier judge on hand-written answers: satisfied, violated and partly satisfied constraints."""

from __future__ import annotations

import pytest

from judge.verifier import score, score_constraints, words


def task(*constraints: dict) -> dict:
    return {"kind": "constraints", "constraints": list(constraints)}


def test_words_are_counted_like_people_count_them():
    assert words("- Don't panic, it's fine.\n- 42 cats") == ["Don't", "panic", "it's", "fine", "42", "cats"]


@pytest.mark.parametrize("text,expected", [
    ("the sea is wide and deep", 1.0),                      # 6 words <= 8
    ("one two three four five six seven eight", 1.0),       # exactly 8
    ("one two three four five six seven eight nine ten", 0.75),  # 2 over: 1 - 2/8
    (" ".join(["w"] * 16), 0.0),                            # 2n words: nothing left
    (" ".join(["w"] * 40), 0.0),
])
def test_max_words(text, expected):
    assert score(task({"type": "max_words", "n": 8}), text) == pytest.approx(expected)


def test_lowercase():
    t = task({"type": "lowercase"})
    assert score(t, "the ocean is blue and calm.") == 1.0
    assert score(t, "The ocean is blue and calm.") == pytest.approx(5 / 6)
    assert score(t, "THE OCEAN") == 0.0


def test_include_word_is_a_whole_word_in_any_case():
    t = task({"type": "include_word", "word": "time"})
    assert score(t, "Time flies.") == 1.0
    assert score(t, "it is (time) now") == 1.0
    assert score(t, "sometimes it rains") == 0.0
    assert score(t, "it rains") == 0.0


@pytest.mark.parametrize("text,expected", [
    ("The sea is calm. That is all.", 1.0),
    ("the sea is calm. that is all.  \n", 1.0),
    ('the sea is calm. "that is all."', 1.0),      # quotes around the phrase
    ("the sea is calm. That is all!", 0.5),        # different final punctuation
    ("the sea is calm, that is all", 0.5),
    ("that is all. the sea is calm.", 0.25),       # phrase, but not at the end
    ("the sea is calm.", 0.0),
])
def test_end_with(text, expected):
    assert score(task({"type": "end_with", "phrase": "that is all."}), text) == expected


def test_no_commas():
    t = task({"type": "no_commas"})
    assert score(t, "calm and blue") == 1.0
    assert score(t, "calm, blue") == 0.75
    assert score(t, "a, b, c, d, e, f") == 0.0


def test_bullet_points():
    t = task({"type": "bullet_points", "n": 3})
    assert score(t, "Here:\n- one\n- two\n- three") == 1.0
    assert score(t, "  - one\n  - two\n  - three\n") == 1.0
    assert score(t, "- one\n- two") == pytest.approx(2 / 3)
    assert score(t, "- a\n- b\n- c\n- d\n- e\n- f") == 0.0
    assert score(t, "* one\n* two\n* three") == 0.5       # bullets, but not the asked-for "- "
    assert score(t, "1. one\n2. two\n3. three") == 0.5
    assert score(t, "one, two and three") == 0.0
    assert score(t, "-one\n-two\n-three") == 0.0          # "- " means a dash and a space


def test_mean_over_constraints_and_detail():
    t = task({"type": "max_words", "n": 4}, {"type": "no_commas"}, {"type": "include_word", "word": "sea"})
    detail = score_constraints(t, "The sea, wide and deep")  # 5 words: 1 - 1/4; one comma
    assert detail == {"max_words(n=4)": 0.75, "no_commas": 0.75, "include_word(word=sea)": 1.0}
    assert score(t, "The sea, wide and deep") == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    repeated = score_constraints(task({"type": "no_commas"}, {"type": "no_commas"}), "a, b")
    assert list(repeated) == ["no_commas", "no_commas#2"]


def test_blank_answer_scores_zero_everywhere():
    t = task({"type": "max_words", "n": 20}, {"type": "lowercase"}, {"type": "no_commas"})
    for text in ("", "   \n", "- \n..."):
        assert score(t, text) == 0.0
    assert score(t, "ok") == 1.0


@pytest.mark.parametrize("bad,message", [
    ({"kind": "math", "answer": 4}, "kind"),
    ({}, "kind"),
    ("constraints", "mapping"),
    ({"kind": "constraints"}, "non-empty list"),
    ({"kind": "constraints", "constraints": []}, "non-empty list"),
    (task("max_words"), "mapping"),
    (task({"type": "shout"}), "unknown type 'shout'"),
    (task({"type": "max_words"}), "'n'"),
    (task({"type": "max_words", "n": "20"}), "'n'"),
    (task({"type": "max_words", "n": 0}), "'n'"),
    (task({"type": "max_words", "n": True}), "'n'"),
    (task({"type": "bullet_points", "n": 2.5}), "'n'"),
    (task({"type": "include_word", "word": " "}), "'word'"),
    (task({"type": "end_with"}), "'phrase'"),
    (task({"type": "lowercase", "strict": True}), "unexpected field"),
])
def test_malformed_tasks_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        score(bad, "some answer")

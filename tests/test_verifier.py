"""The verifier judge on hand-written answers: satisfied, violated and partly satisfied constraints, and the
one-word answers an online loop learned from it, which the substance constraints now score below a real answer."""

from __future__ import annotations

import pytest

from judge.verifier import on_topic, score, score_constraints, strict_pass, topic_words, words
from service.task import CONSTRAINT_TYPES, make_prompt


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


def test_min_words():
    t = task({"type": "min_words", "n": 8})
    assert score(t, "calm") == 0.125                                      # one word of eight
    assert score(t, "the sea is calm") == 0.5
    assert score(t, "the sea is calm and the sky is blue") == 1.0         # 9 >= 8
    assert score(t, "one two three four five six seven eight") == 1.0     # exactly 8
    assert score(t, "- the sea\n- is calm") == 0.5                        # bullets' dashes are no words


def test_a_word_range_scores_both_ends():
    t = task({"type": "max_words", "n": 12}, {"type": "min_words", "n": 4})
    assert score(t, "no") == pytest.approx((1.0 + 0.25) / 2)              # short: the floor takes 3/4 off
    assert score(t, "the sea is calm today") == 1.0
    assert score(t, " ".join(["sea"] * 18)) == pytest.approx((0.5 + 1.0) / 2)  # long: 6 over 12


def test_on_topic_is_one_of_the_words_as_a_whole_word():
    t = task({"type": "on_topic", "words": ["beach", "shore", "sand"]})
    assert score(t, "The Beach is calm.") == 1.0
    assert score(t, "we walked along the SHORE") == 1.0
    assert score(t, "sandy toes and beaches") == 0.0                      # no listed word as a whole word
    assert score(t, "the stock market fell today") == 0.0
    assert score(t, "") == 0.0
    assert on_topic("sand, sun and sea", ["sand"]) and not on_topic("sandals", ["sand"])
    assert topic_words(t) == ["beach", "shore", "sand"]
    assert topic_words(task({"type": "lowercase"})) is None and topic_words({"kind": "regex"}) is None


def test_bullets_need_content_when_a_minimum_is_asked():
    t = task({"type": "bullet_points", "n": 3, "min_words": 3})
    full = "- the sea is calm\n- waves roll in\n- gulls cry loudly"
    assert score(t, full) == 1.0
    assert score(task({"type": "bullet_points", "n": 3}), "- a\n- b\n- c") == 1.0  # no minimum: any bullet counts
    assert score(t, "- a\n- b\n- c") == 0.0                              # three bullets, no content
    assert score(t, "- the sea is calm\n- waves\n- gulls") == pytest.approx(1 / 3)
    assert score(t, "- the sea is calm\n- waves roll in") == pytest.approx(2 / 3)  # content, one bullet short
    assert score(t, full.replace("- ", "* ")) == 0.5                      # other markers: half, as before
    assert score(t, "* the sea is calm\n* waves\n* gulls") == pytest.approx(0.5 / 3)
    assert score(t, "- a\n- b\n- c\n" + full.replace("- ", "* ")) == 0.5  # the better kind of bullets counts


def test_strict_pass_needs_every_constraint_in_full():
    t = task({"type": "lowercase"}, {"type": "no_commas"}, {"type": "on_topic", "words": ["zoo"]})
    assert strict_pass(t, "the zoo is a happy place")
    assert not strict_pass(t, "the zoo, a happy place")                  # 0.75 on no_commas
    assert not strict_pass(t, "no") and not strict_pass(t, "")


def old_task(task_: dict) -> dict:
    """The task as the generator made it before the substance constraints (min_words, on_topic, bullet content)."""
    drawn = [{k: v for k, v in c.items() if not (c["type"] == "bullet_points" and k == "min_words")}
             for c in task_["constraints"] if c["type"] in CONSTRAINT_TYPES]
    return {"kind": "constraints", "constraints": drawn}


# Bundled prompts and the answers a policy trained on the rule verifier alone learned for them, with an
# answer a person would write. heldout-0003 is the museum prompt with the word range it has today (the field
# saw "at most 14 words" from the earlier generator).
FIELD_HACKS = [
    ("heldout-0021", "Say something nice about the zoo. Write only in lowercase letters. Do not use any commas.",
     "no", "the zoo is a happy place where families meet friendly animals"),
    ("heldout-0003", 'Describe a museum. Write only in lowercase letters. Include the word "world". '
                     "Use between 5 and 16 words.",
     "world.", "the museum shows art and old treasures from all over the world"),
    ("heldout-0002", 'Tell me about the beach. Write only in lowercase letters. Include the word "beautiful".',
     "beautiful.", "the beach is beautiful with soft sand and warm blue water"),
]


@pytest.mark.parametrize("prompt_id,text,hack,real", FIELD_HACKS)
def test_the_one_word_hacks_from_the_field_score_well_below_a_real_answer(prompt_id, text, hack, real):
    p = make_prompt("heldout", int(prompt_id.split("-")[1]))
    assert p.messages[0].content == text
    assert score(old_task(p.task), hack) == 1.0  # what the loop exploited: every old rule met
    assert score(p.task, real) == 1.0 and strict_pass(p.task, real)
    assert score(p.task, hack) <= 2 / 3 and not strict_pass(p.task, hack)
    detail = score_constraints(p.task, hack)
    assert [k for k, v in detail.items() if v < 1] == [k for k in detail if k.startswith(("min_words", "on_topic"))]


def test_a_museum_prompt_with_at_most_14_words_and_the_word_world():
    """The field's museum prompt, built as the generator builds one today (floor max(4, 14 // 3) = 4)."""
    t = task({"type": "include_word", "word": "world"}, {"type": "max_words", "n": 14}, {"type": "min_words", "n": 4},
             {"type": "on_topic", "words": ["museum", "museums", "exhibits", "exhibit"]})
    assert score(old_task(t), "world.") == 1.0
    assert score(t, "world.") == pytest.approx((1 + 1 + 0.25 + 0) / 4)
    assert score(t, "The museum shows treasures from all over the world.") == 1.0


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
    (task({"type": "min_words", "n": 0}), "'n'"),
    (task({"type": "bullet_points", "n": 2, "min_words": 0}), "'min_words'"),
    (task({"type": "on_topic"}), "'words'"),
    (task({"type": "on_topic", "words": "beach"}), "'words'"),  # a list of words, not one string
    (task({"type": "on_topic", "words": []}), "'words'"),
    (task({"type": "on_topic", "words": ["beach", " "]}), "'words'"),
])
def test_malformed_tasks_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        score(bad, "some answer")

"""The format families of the bundled task: drawn compatibly, stated in the project's own words, checked by the
verifier (an obeying answer scores 1, near misses score partial credit, bare markers do not pass), and the
fluency signal scores the obeying answer on the same words as the plain one."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from judge.surface import surface_form
from judge.verifier import parse_constraints, score, strict_pass
from service.task import CURRICULA, make_prompt, make_prompts
from service.task_formats import FORMAT_TYPES, compatible

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "ifeval" / "input_data.jsonl"


def _task(*constraints) -> dict:
    return {"kind": "constraints", "constraints": list(constraints)}


# (constraint, an answer that obeys it, one that nearly does, its expected partial score)
CASES = [
    ({"type": "keyword_count", "word": "time", "n": 3}, "Time flies. We had time. No time left.",
     "Time flies. We had fun.", 1 / 3),
    ({"type": "forbid_word", "word": "very"}, "The sea is calm.", "The sea is very calm.", 0.0),
    ({"type": "max_sentences", "n": 2}, "The sea is calm. It is blue!", "One. Two. Three.", 0.5),
    ({"type": "paragraphs", "n": 2}, "The sea is calm today.\n***\nThe waves are small now.",
     "The sea is calm today.", 0.5),
    ({"type": "numbered_list", "n": 3}, "1. The sea is calm.\n2. The sand is warm.\n3. The sky is blue.",
     "1. The sea is calm.\n2. The sand is warm.", 2 / 3),
    ({"type": "sections", "n": 2, "marker": "Part"}, "Part 1\nThe sea is calm.\nPART 2: The sand is warm.",
     "Part 1\nThe sea is calm.\nPart 2", 0.5),
    ({"type": "title"}, "<<Calm Sea>>\nThe sea is calm.", "<<A Title>>\nThe sea is calm.", 0.5),
    ({"type": "json"}, '```json\n{"sea": "calm", "sky": "blue"}\n```', '{"sea": "calm", "sky": ', 0.25),
    ({"type": "highlights", "n": 2}, "The *sea* is **calm** today.", "The *sea* is calm today.", 0.5),
    ({"type": "uppercase"}, "THE SEA IS CALM.", "THE SEA is calm.", 0.5),
    ({"type": "start_with", "phrase": "In short"}, '"In short, the sea is calm.', "The sea is calm, in short.",
     0.25),
    ({"type": "postscript", "marker": "P.S."}, "The sea is calm.\nP.S. Bring a hat.", "The sea (P.S. calm).",
     0.5),
    ({"type": "placeholders", "n": 2}, "Dear [name], meet me at [place].", "Dear [name], meet me.", 0.5),
    ({"type": "repeat_request", "text": "Describe the ocean."}, "Describe the ocean. The ocean is deep and wide.",
     "describe  THE ocean.", 0.5),
    ({"type": "two_responses"}, "The sea is calm today.\n******\nThe waves are small now.",
     "The sea is calm today.\n******\nThe sea is calm today.", 0.5),
    ({"type": "quoted"}, '"The sea is calm."', 'The sea is "calm".', 0.0),
]


def test_every_format_type_has_a_case():
    assert {c["type"] for c, *_ in CASES} == set(FORMAT_TYPES)


@pytest.mark.parametrize("constraint,obeys,near,partial", CASES, ids=[c["type"] for c, *_ in CASES])
def test_an_obeying_answer_scores_one_and_a_near_miss_its_partial_credit(constraint, obeys, near, partial):
    task = _task(constraint)
    parse_constraints(task)
    assert score(task, obeys) == 1.0 and strict_pass(task, obeys)
    assert score(task, near) == pytest.approx(partial)
    assert not strict_pass(task, near)


@pytest.mark.parametrize("constraint", [
    {"type": "numbered_list", "n": 2}, {"type": "paragraphs", "n": 2}, {"type": "sections", "n": 2, "marker": "Part"},
    {"type": "two_responses"}, {"type": "repeat_request", "text": "Describe the ocean."}, {"type": "highlights", "n": 2}])
def test_bare_markers_without_content_do_not_pass(constraint):
    bare = {"numbered_list": "1. a\n2. b", "paragraphs": "sea\n***\nsun", "sections": "Part 1\nPart 2",
            "two_responses": "sea\n******\nsun", "repeat_request": "Describe the ocean.",
            # the game seen in a run: the word itself "highlighted" (marks nothing of the answer)
            "highlights": "1. **Highlighted** - **highlighted section 2** refers to the sea"}[constraint["type"]]
    assert score(_task(constraint), bare) < 1.0


def test_bad_format_constraints_are_refused():
    for bad in ({"type": "keyword_count", "word": "x"}, {"type": "sections", "n": 2}, {"type": "title", "n": 1},
                {"type": "highlights", "n": 0}, {"type": "repeat_request", "text": " "}):
        with pytest.raises(ValueError):
            parse_constraints(_task(bad))


def test_format_prompts_cover_every_family_compatibly_and_their_stated_values_are_the_checked_ones():
    prompts = make_prompts("train", 600, curriculum="formats")
    kinds = Counter(c["type"] for p in prompts for c in p.task["constraints"])
    assert set(FORMAT_TYPES) <= set(kinds), set(FORMAT_TYPES) - set(kinds)
    for p in prompts:
        cs = parse_constraints(p.task)
        types = [c["type"] for c in cs if c["type"] not in ("on_topic", "min_words")]
        assert compatible(types), (p.id, types)
        assert any(t in FORMAT_TYPES for t in types), p.id
        text = p.messages[0].content
        for c in cs:  # what the verifier checks is what the prompt says
            for field in ("word", "phrase", "marker"):
                if field in c:
                    assert c[field] in text, (p.id, c)
            if c["type"] == "repeat_request":
                assert text.startswith(c["text"]), p.id


def test_mixed_curriculum_alternates_basic_and_format_prompts_with_distinct_ids():
    mixed = make_prompts("heldout", 10, curriculum="mixed")
    assert [p.id for p in mixed[:4]] == ["heldout-0000", "heldout-f0000", "heldout-0001", "heldout-f0001"]
    assert mixed[2] == make_prompt("heldout", 1) and mixed[3] == make_prompt("heldout", 1, curriculum="formats")
    assert len({p.id for p in make_prompts("train", 200, curriculum="mixed")}) == 200
    with pytest.raises(ValueError, match="curriculum"):
        make_prompt("train", 0, curriculum="fancy")
    assert set(CURRICULA) == {"basic", "formats", "mixed"}


def test_the_fluency_signal_scores_an_obeying_answer_on_the_same_words_as_a_plain_one():
    plain = "The ocean is deep. I love its calm blue water."
    cases = [
        (_task({"type": "uppercase"}), plain.upper()),
        (_task({"type": "title"}, {"type": "highlights", "n": 1}), "<<The ocean>>\nThe ocean is deep. I love its "
                                                                    "*calm* blue water."),
        (_task({"type": "sections", "n": 2, "marker": "Part"}), "Part 1: The ocean is deep.\nPart 2: I love its "
                                                                "calm blue water."),
        (_task({"type": "quoted"}, {"type": "postscript", "marker": "P.S."}), '"The ocean is deep. I love its calm '
                                                                             'blue water."'),
        (_task({"type": "repeat_request", "text": "Describe the ocean."}), "Describe the ocean. " + plain),
        (_task({"type": "json"}), json.dumps({"a": "The ocean is deep.", "b": "I love its calm blue water."})),
    ]
    for task, obeying in cases:
        assert _words(surface_form(task, obeying)) == _words(surface_form(task, plain)) or \
            _words(surface_form(task, obeying)) == _words("The ocean. " + plain), (task, surface_form(task, obeying))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _eight_grams(text: str) -> set[tuple[str, ...]]:
    ws = _words(text)
    return {tuple(ws[i:i + 8]) for i in range(len(ws) - 7)}


def test_bundled_prompts_share_no_8_gram_with_the_public_benchmark():
    """The loop never trains on a benchmark's prompts, nor on sentences copied from them."""
    bench = set()
    with open(BENCHMARK, encoding="utf-8") as f:
        for line in f:
            bench |= _eight_grams(json.loads(line)["prompt"])
    assert len(bench) > 10_000  # the real benchmark, not an empty file
    ours = set()
    for split, n in (("train", 3000), ("heldout", 1000)):
        for p in make_prompts(split, n, curriculum="mixed"):
            ours |= _eight_grams(p.messages[0].content)
    shared = ours & bench
    assert not shared, sorted(" ".join(g) for g in shared)[:5]


def test_the_overlap_check_would_see_a_copied_instruction():
    bench_prompt = ("Write a story of exactly 2 paragraphs about a man who wakes up one day and realizes that he's "
                    "inside a video game.")
    assert _eight_grams(bench_prompt) & _eight_grams("Tell me about snow. " + bench_prompt)

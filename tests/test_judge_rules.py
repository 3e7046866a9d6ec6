"""The verifier's other rule kinds: exact answers, regexes and allowed Python callables."""

from __future__ import annotations

import pytest

from judge.rules import score_task, strict_task
from service.task import make_prompt


def sea_score(text: str, per_mention: float = 0.5) -> float:
    """A task-specific check, named by `tests.test_judge_rules:sea_score` in task metadata."""
    return min(1.0, text.lower().count("sea") * per_mention)


def test_constraints_go_to_the_bundled_verifier():
    p = make_prompt("train", 0)
    assert 0.0 <= score_task(p.task, "a short answer") <= 1.0
    assert score_task(p.task, "") == 0.0


def test_strict_task_is_every_constraint_or_a_full_score():
    p = make_prompt("heldout", 21)  # the zoo: lowercase, no commas, on topic
    assert strict_task(p.task, "the zoo is a happy place where families meet friendly animals")
    assert not strict_task(p.task, "no")  # lowercase, no commas: 2 of 3
    assert not strict_task(p.task, "The zoo is a happy place.")  # 4 of 5 words lowercase
    assert strict_task({"kind": "exact", "answer": "Paris"}, "paris.")
    assert not strict_task({"kind": "exact", "answer": "Paris"}, "Lyon")
    with pytest.raises(ValueError, match="kind"):
        strict_task({"kind": "math"}, "4")


@pytest.mark.parametrize("answer,text,expected", [
    ("Paris", "Paris", 1.0),
    ("Paris", "  paris. ", 1.0),             # case, whitespace and final punctuation do not matter
    ("Paris", '"Paris!"', 1.0),
    ("Paris", "Paris, France", 0.0),
    (["Paris", "Paris, France"], "paris,   france", 1.0),
    ("Paris", "", 0.0),
])
def test_exact(answer, text, expected):
    assert score_task({"kind": "exact", "answer": answer}, text) == expected


def test_exact_case_sensitive():
    assert score_task({"kind": "exact", "answer": "NaCl", "case_sensitive": True}, "nacl") == 0.0
    assert score_task({"kind": "exact", "answer": "NaCl", "case_sensitive": True}, "NaCl.") == 1.0


def test_regex():
    assert score_task({"kind": "regex", "pattern": r"\b42\b"}, "The answer is 42.") == 1.0
    assert score_task({"kind": "regex", "pattern": r"\b42\b"}, "The answer is 421.") == 0.0
    assert score_task({"kind": "regex", "pattern": r"\d+", "fullmatch": True}, " 42\n") == 1.0
    assert score_task({"kind": "regex", "pattern": r"\d+", "fullmatch": True}, "42 apples") == 0.0
    assert score_task({"kind": "regex", "pattern": "yes", "ignore_case": True}, "YES") == 1.0


def test_callable_runs_only_allowed_modules():
    task = {"kind": "callable", "path": "tests.test_judge_rules:sea_score"}
    assert score_task(task, "The sea, the sea!", allowed_modules=["tests"]) == 1.0
    assert score_task({**task, "args": {"per_mention": 0.25}}, "the sea", allowed_modules=["tests.test_judge_rules"]) \
        == 0.25
    with pytest.raises(ValueError, match="not allowed"):
        score_task(task, "the sea")  # off by default: a message must not choose code to run
    with pytest.raises(ValueError, match="not allowed"):
        score_task({"kind": "callable", "path": "os:system"}, "echo hi", allowed_modules=["tests"])
    with pytest.raises(ValueError, match="not allowed"):
        score_task({"kind": "callable", "path": "testsuite:f"}, "x", allowed_modules=["tests"])  # not a package of it


@pytest.mark.parametrize("task,message", [
    ({"kind": "exact"}, "missing field"),
    ({"kind": "exact", "answer": ""}, "non-blank"),
    ({"kind": "exact", "answer": []}, "non-empty"),
    ({"kind": "exact", "answer": "x", "case": True}, "unexpected field"),
    ({"kind": "regex", "pattern": "("}, "bad pattern"),
    ({"kind": "regex", "pattern": "x", "fullmatch": "yes"}, "true or false"),
    ({"kind": "callable", "path": "tests.test_judge_rules"}, "pkg.mod:fn"),
    ({"kind": "callable", "path": "tests.test_judge_rules:nothing_here"}, "cannot import"),
    ({"kind": "callable", "path": "tests.test_judge_rules:sea_score", "args": {"bogus": 1}}, "failed: TypeError"),
    ({"kind": "callable", "path": "tests.test_judge_rules:TASK_NAN"}, "not callable"),
    ({"kind": "math", "answer": 4}, "got kind 'math'"),
    ("exact", "mapping"),
])
def test_malformed_rule_tasks_raise_value_error(task, message):
    with pytest.raises(ValueError, match=message):
        score_task(task, "The sea", allowed_modules=["tests"])


TASK_NAN = float("nan")


def test_callable_must_return_a_finite_number():
    with pytest.raises(ValueError, match="failed: TypeError"):
        score_task({"kind": "callable", "path": "math:sqrt"}, "4", allowed_modules=["math"])
    assert score_task({"kind": "callable", "path": "builtins:bool"}, "x", allowed_modules=["builtins"]) == 1.0
    with pytest.raises(ValueError, match="not a finite number"):
        score_task({"kind": "callable", "path": "builtins:str"}, "x", allowed_modules=["builtins"])
    with pytest.raises(ValueError, match="not a finite number"):
        score_task({"kind": "callable", "path": "builtins:float"}, "nan", allowed_modules=["builtins"])

"""A prompt's regex runs with a time limit: a catastrophic pattern is scored (0) within the limit, never a hang.

Each scoring runs in a child process with a wall-clock limit, so on code without a time limit the test fails
(the stdlib `re` holds the GIL while it backtracks: an in-process check could not even time out).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.contracts import MAX_REGEX_PATTERN_CHARS, ChatMessage, PromptEvent

LIMIT_S = 0.1
WALL_S = 20  # far above the limit (a loaded 2-core box); `re` on these takes longer than the universe has left

SCORE = r"""
import json, sys, time
from prometheus_client import REGISTRY
from judge.rules import score_task
cases = json.loads(sys.argv[1])
out = []
for task, text in cases:
    t = time.monotonic()
    score = score_task(task, text)  # the default limit, JudgeSettings.regex_timeout_s = %r
    out.append([score, time.monotonic() - t])
out.append(REGISTRY.get_sample_value("odpo_judge_regex_timeouts_total") or 0.0)
print(json.dumps(out))
""" % LIMIT_S


def score_in_child(cases: list) -> list:
    proc = subprocess.run([sys.executable, "-c", SCORE, json.dumps(cases)], capture_output=True, text=True,
                          timeout=WALL_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_catastrophic_regex_is_scored_within_the_time_limit():
    evil = "a" * 5000 + "!"
    cases = [
        [{"kind": "regex", "pattern": "(a+)+$"}, evil],  # catastrophic for `re`
        [{"kind": "regex", "pattern": "(a|a)+$"}, evil],  # catastrophic for the `regex` library too: times out
        [{"kind": "regex", "pattern": "(a|a)+$", "fullmatch": True}, evil],
        [{"kind": "regex", "pattern": r"\b42\b"}, "the answer is 42."],  # a sound pattern still scores
    ]
    try:
        *results, timeouts = score_in_child(cases)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scoring a catastrophic regex did not finish within {WALL_S} s (no time limit)")
    assert [score for score, _ in results] == [0.0, 0.0, 0.0, 1.0]
    for score, took in results:
        assert took < LIMIT_S + 1.0, f"a match took {took:.2f} s with a {LIMIT_S} s limit"
    assert timeouts >= 2  # counted (odpo_judge_regex_timeouts_total)


def _prompt(task: dict) -> PromptEvent:
    return PromptEvent(id="p", messages=[ChatMessage(role="user", content="Say a number.")], task=task)


def test_a_prompt_with_an_overlong_or_broken_pattern_is_refused_where_it_is_accepted():
    assert _prompt({"kind": "regex", "pattern": r"\d+"}).task["pattern"] == r"\d+"
    for bad in ("a" * (MAX_REGEX_PATTERN_CHARS + 1), "(unclosed", ""):
        with pytest.raises(ValidationError, match="pattern"):
            _prompt({"kind": "regex", "pattern": bad})


def test_the_judge_setting_reaches_the_verifier():
    from core.settings import JudgeSettings
    from judge.registry import make_plugin

    plugin = make_plugin(JudgeSettings(regex_timeout_s=0.05))
    assert plugin.regex_timeout_s == 0.05

"""The `verifier` plugin: rule checks from the prompt's task metadata (judge/rules.py)."""

from __future__ import annotations

from typing import Sequence

from judge.base import Judgement
from judge.rules import REGEX_TIMEOUT_S, score_task
from core.contracts import PromptEvent


class RuleJudge:
    name = "verifier"

    def __init__(self, allowed_modules: Sequence[str] = (), regex_timeout_s: float = REGEX_TIMEOUT_S):
        self.allowed_modules = tuple(allowed_modules)
        self.regex_timeout_s = regex_timeout_s

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        return Judgement([score_task(prompt.task, r, self.allowed_modules, self.regex_timeout_s) for r in responses])

"""The `verifier` plugin: rule checks from the prompt's task metadata (judge/rules.py)."""

from __future__ import annotations

from typing import Sequence

from judge.base import Judgement
from judge.rules import score_task
from core.contracts import PromptEvent


class RuleJudge:
    name = "verifier"

    def __init__(self, allowed_modules: Sequence[str] = ()):
        self.allowed_modules = tuple(allowed_modules)

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        return Judgement([score_task(prompt.task, r, self.allowed_modules) for r in responses])

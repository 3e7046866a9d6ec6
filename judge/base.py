"""The judge plugin protocol (the plugins' registry is judge/registry.py).

A judge scores the responses of one prompt (`judge`), and a pairwise judge can
also compare two responses (`compare`). Scoring judges (verifier, reward
model) give each response a number; a pairwise judge (the LLM judge) scores a
set by round-robin win rate and also returns its direct verdicts, so pair
construction never emits a pair whose own comparison was a tie.

Errors say what the judge service should do:
- `ValueError`: this input cannot be judged (a task of another kind, a prompt
  the endpoint refuses): the candidate set goes to odpo.dlq;
- `JudgeUnavailable`: the judge itself cannot work right now (endpoint down,
  wrong key): nothing is committed and the batch is judged again later.

The `human` plugin is no `Judge`: it turns odpo.feedback into pairs (judge/feedback.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from core.contracts import PromptEvent

class JudgeUnavailable(RuntimeError):
    """The judge cannot score anything at the moment; retry later, do not dead-letter."""


@dataclass(frozen=True)
class Judgement:
    """Scores of one prompt's responses, higher is better.

    `verdicts[(i, j)]` (i < j), set by pairwise judges only: +1 when response i
    beat j, -1 when j beat i, 0 for a tie (including position-inconsistent verdicts).
    """

    scores: list[float]
    verdicts: dict[tuple[int, int], int] | None = None
    # Set by the quality guard (judge/composite.py): why response i is degenerate, None where it passes.
    # A degenerate response is never the chosen side of a pair.
    failures: list[str | None] | None = None

    def degenerate(self, i: int) -> str | None:
        return self.failures[i] if self.failures is not None else None

    def verdict(self, winner: int, loser: int) -> int | None:
        """+1 if the judge directly preferred `winner` over `loser`, 0 tie, -1 the reverse; None if unknown."""
        if self.verdicts is None:
            return None
        if winner < loser:
            return self.verdicts.get((winner, loser))
        v = self.verdicts.get((loser, winner))
        return None if v is None else -v


def chat_messages(prompt: PromptEvent) -> list[dict]:
    """The prompt's chat turns as plain dicts (a raw-text prompt as one user turn)."""
    if prompt.messages:
        return [m.model_dump() for m in prompt.messages]
    return [{"role": "user", "content": prompt.text}]


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        """Score every response to `prompt`."""
        ...


@runtime_checkable
class PairwiseJudge(Judge, Protocol):
    def compare(self, prompt: PromptEvent, a: str, b: str) -> int:
        """+1 if `a` is better than `b`, -1 if `b` is, 0 for a tie or no clear verdict."""
        ...

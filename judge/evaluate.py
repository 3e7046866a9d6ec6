"""`odpo eval`: models served at OpenAI-compatible URLs, compared on held-out prompts by several signals.

For each model: greedy answers to the same prompts (real HTTP, so the numbers
are what a client of that URL gets), one row per answer (judge/signals.py),
the signals with intervals. Against the reference model (the first one, or
`reference`): the paired difference of task scores with its 95% bootstrap
interval, and the pairwise win rate by a judge asked in both orders (a
verdict that changes with the order is a tie; ties are counted apart).

The promotion gate reuses `answer_prompts`, `score_answers` and `summarize`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from judge.base import Judge, chat_messages
from judge.quality import GuardLimits, ReferenceLogprobs
from judge.signals import AnswerRow, score_answers, summarize
from judge.stats import bootstrap_mean, paired_difference
from core.contracts import PromptEvent


@dataclass
class Target:
    """A model to evaluate: a name at an OpenAI-compatible base URL (up to, not including, /v1)."""

    model: str
    url: str
    label: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # e.g. `Authorization: Bearer <key>`

    def __post_init__(self):
        self.label = self.label or self.model


@dataclass
class ModelResult:
    target: Target
    served_version: str | None
    rows: list[AnswerRow]
    signals: dict
    seconds: float
    versus: dict = field(default_factory=dict)  # against the reference: paired score difference, win rate

    def as_dict(self, answers: bool = True) -> dict:
        out = {"label": self.target.label, "model": self.target.model, "url": self.target.url,
               "served_version": self.served_version, "seconds": round(self.seconds, 1), "signals": self.signals,
               "versus_reference": self.versus}
        if answers:
            out["answers"] = [r.as_dict() for r in self.rows]
        return out


def answer_prompts(base_url: str, model: str, prompts: Sequence[PromptEvent], max_tokens: int,
                   concurrency: int = 8, timeout_s: float = 600,
                   headers: dict[str, str] | None = None) -> tuple[list[str], str | None]:
    """Greedy chat answers of `model` to each prompt, and the version the server says it served."""
    if not prompts:
        raise ValueError("no prompts to answer")
    with httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers) as client:

        def ask(prompt: PromptEvent) -> tuple[str, str | None]:
            resp = client.post("/v1/chat/completions", json={
                "model": model, "messages": chat_messages(prompt), "temperature": 0.0, "max_tokens": max_tokens})
            resp.raise_for_status()
            return resp.json()["choices"][0]["message"]["content"] or "", resp.headers.get("x-odpo-policy-version")

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(ask, prompts))
    return [a for a, _ in results], results[0][1]


def evaluate_model(target: Target, prompts: Sequence[PromptEvent], max_tokens: int,
                   reference: ReferenceLogprobs | None = None, limits: GuardLimits = GuardLimits(),
                   concurrency: int = 8, timeout_s: float = 600) -> ModelResult:
    started = time.monotonic()
    answers, served = answer_prompts(target.url, target.model, prompts, max_tokens, concurrency, timeout_s,
                                     headers=target.headers)
    rows = score_answers(prompts, answers, reference, limits)
    return ModelResult(target, served, rows, summarize(rows), time.monotonic() - started)


def verdict_both_orders(judge: Judge, prompt: PromptEvent, a: str, b: str) -> int:
    """+1 when `a` beats `b` asked in both orders, -1 when `b` does, 0 otherwise (tie or order-dependent)."""
    compare = getattr(judge, "compare", None)
    if compare is not None:  # a pairwise judge (the LLM judge asks both orders itself)
        return int(compare(prompt, a, b))
    ab, ba = judge.judge(prompt, [a, b]).scores, judge.judge(prompt, [b, a]).scores
    first, second = _sign(ab[0] - ab[1]), _sign(ba[1] - ba[0])
    return first if first == second else 0


def win_rate(judge: Judge, prompts: Sequence[PromptEvent], ours: Sequence[AnswerRow],
             theirs: Sequence[AnswerRow]) -> dict:
    """Wins, ties and losses of `ours` against `theirs` on the same prompts, with intervals."""
    verdicts = [0 if a.answer == b.answer else verdict_both_orders(judge, p, a.answer, b.answer)
                for p, a, b in zip(prompts, ours, theirs, strict=True)]
    n = len(verdicts)
    wins, losses = verdicts.count(1), verdicts.count(-1)
    decisive = [1.0 if v == 1 else 0.0 for v in verdicts if v != 0]
    return {"judge": judge.name, "n": n, "wins": wins, "ties": n - wins - losses, "losses": losses,
            "win_share": wins / n, "loss_share": losses / n,
            # the standard DPO evaluation: above 0.5 means it helped (ties left out, and reported above)
            "win_rate": bootstrap_mean(decisive).as_dict() if decisive else None}


def compare_models(results: Sequence[ModelResult], reference_index: int, prompts: Sequence[PromptEvent],
                   judge: Judge | None) -> None:
    """Fill each result's `versus` against the reference result."""
    ref = results[reference_index]
    for r in results:
        if r is ref:
            continue
        diff = paired_difference([x.score for x in r.rows], [x.score for x in ref.rows])
        r.versus = {"reference": ref.target.label, "score_difference": diff.as_dict(),
                    "strict_difference": paired_difference([float(x.strict) for x in r.rows],
                                                           [float(x.strict) for x in ref.rows]).as_dict()}
        if judge is not None:
            r.versus["win_rate"] = win_rate(judge, prompts, r.rows, ref.rows)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)

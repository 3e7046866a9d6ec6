"""Held-out evaluation: greedy answers from an OpenAI-compatible endpoint, scored by the verifier.

Goes through real HTTP (the gateway, or any server with the same API), so a
score measures exactly what clients get for that model name.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from judge.rules import score_task
from service.contracts import PromptEvent


@dataclass(frozen=True)
class HeldoutResult:
    model: str
    served_version: str | None
    mean_score: float
    scores: list[float]
    answers: list[str]


def evaluate_heldout(base_url: str, model: str, prompts: list[PromptEvent], max_tokens: int,
                     concurrency: int = 8, timeout_s: float = 600) -> HeldoutResult:
    """Greedy chat completions of `prompts` for `model`, each scored against its constraints."""
    if not prompts:
        raise ValueError("no held-out prompts to evaluate")
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:

        def ask(prompt: PromptEvent) -> tuple[str, str | None]:
            messages = [m.model_dump() for m in prompt.messages] if prompt.messages else \
                [{"role": "user", "content": prompt.text}]
            resp = client.post("/v1/chat/completions", json={
                "model": model, "messages": messages, "temperature": 0.0, "max_tokens": max_tokens})
            resp.raise_for_status()
            return resp.json()["choices"][0]["message"]["content"] or "", resp.headers.get("x-odpo-policy-version")

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(ask, prompts))
    answers = [a for a, _ in results]
    scores = [score_task(p.task, a) for p, a in zip(prompts, answers)]
    return HeldoutResult(model, results[0][1], sum(scores) / len(scores), scores, answers)

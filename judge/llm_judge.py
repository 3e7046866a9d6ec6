"""The `llm_judge` plugin: pairwise LLM-as-judge over any OpenAI-compatible chat endpoint.

Every comparison is asked twice, with the two responses in both orders.
LLM judges favour a position (often the first); a verdict that flips with the
order is that bias, not a preference, so it counts as a tie. Only a response
that wins in both orders wins. A set of n responses is scored by round-robin
win rate (a tie is half a win), and the direct verdicts go along so pair
construction never emits a pair the judge did not clearly decide.

The endpoint is the project's own gateway by default, or any remote one; its
API key is read from the environment variable the settings name (never from
the settings themselves). Transient failures (connection errors, timeouts,
408/429/5xx) are retried with exponential backoff; when they persist, or the
endpoint refuses us (401/403/404), the judge is `JudgeUnavailable` and the
service retries the batch later. A 400/422 for one request means this input
cannot be judged (`ValueError`, dead-lettered).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import httpx

from judge import metrics as M
from judge.base import Judgement, JudgeUnavailable
from core.contracts import PromptEvent
from core.settings import JudgeSettings

log = logging.getLogger(__name__)

_RETRYABLE = {408, 409, 425, 429}
_REFUSED = {401, 403, 404}


def render_prompt(prompt: PromptEvent) -> str:
    """The request as the judge reads it: the user's text, or the conversation turn by turn."""
    if prompt.text is not None:
        return prompt.text
    msgs = prompt.messages or []
    if len(msgs) == 1:
        return msgs[0].content
    return "\n".join(f"{m.role.capitalize()}: {m.content}" for m in msgs)


def combine(first: str | None, second: str | None) -> tuple[int, str]:
    """Verdict on (a, b) from the letter chosen with a shown first and the one chosen with b shown first.

    Returns (+1 a wins | -1 b wins | 0 tie, outcome) with outcome one of
    `consistent`, `inconsistent` (the letter followed the position) or `no_verdict`.
    """
    if first is None or second is None:
        return 0, "no_verdict"
    if first == "A" and second == "B":
        return 1, "consistent"
    if first == "B" and second == "A":
        return -1, "consistent"
    return 0, "inconsistent"


class LlmJudge:
    name = "llm_judge"

    def __init__(self, base_url: str, model: str, template: str, verdict_regex: str, api_key: str | None = None,
                 system: str | None = None, max_tokens: int = 8, timeout_s: float = 60, retries: int = 3,
                 backoff_s: float = 0.5, concurrency: int = 4):
        self.model, self.template, self.system, self.max_tokens = model, template, system, max_tokens
        self.verdict = re.compile(verdict_regex)
        self.retries, self.backoff_s, self.concurrency = retries, backoff_s, concurrency
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers)

    @classmethod
    def from_settings(cls, s: JudgeSettings) -> "LlmJudge":
        key = os.environ.get(s.llm_judge_api_key_env) if s.llm_judge_api_key_env else None
        return cls(s.llm_judge_url, s.llm_judge_model, s.llm_judge_template, s.llm_judge_verdict_regex, api_key=key,
                   system=s.llm_judge_system, max_tokens=s.llm_judge_max_tokens, timeout_s=s.llm_judge_timeout_s,
                   retries=s.llm_judge_retries, backoff_s=s.llm_judge_backoff_s,
                   concurrency=s.llm_judge_concurrency)

    def close(self) -> None:
        self.client.close()

    def ask(self, prompt: PromptEvent, a: str, b: str) -> str | None:
        """The letter ("A" or "B") the judge model picks with `a` shown as A; None if it gives none."""
        content = self.template.format(prompt=render_prompt(prompt), a=a, b=b)
        reply = self._complete(content)
        m = self.verdict.search(reply)
        return m.group(1).upper() if m else None

    def compare(self, prompt: PromptEvent, a: str, b: str) -> int:
        with ThreadPoolExecutor(max_workers=min(2, self.concurrency)) as pool:
            first, second = pool.map(lambda ab: self.ask(prompt, *ab), [(a, b), (b, a)])
        return self._record(first, second)

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        n = len(responses)
        pairs = [(i, j) for i, j in itertools.combinations(range(n), 2) if responses[i] != responses[j]]
        asks = [(i, j) for i, j in pairs] + [(j, i) for i, j in pairs]  # every pair in both orders
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            letters = list(pool.map(lambda ij: self.ask(prompt, responses[ij[0]], responses[ij[1]]), asks))
        verdicts = {(i, j): 0 for i, j in itertools.combinations(range(n), 2)}  # identical texts: a tie
        for k, (i, j) in enumerate(pairs):
            verdicts[(i, j)] = self._record(letters[k], letters[k + len(pairs)])
        wins = [0.0] * n
        for (i, j), v in verdicts.items():
            wins[i] += 1.0 if v > 0 else 0.5 if v == 0 else 0.0
            wins[j] += 1.0 if v < 0 else 0.5 if v == 0 else 0.0
        return Judgement([w / (n - 1) for w in wins], verdicts)

    def _record(self, first: str | None, second: str | None) -> int:
        verdict, outcome = combine(first, second)
        M.observe_llm_comparison(outcome)
        return verdict

    def _complete(self, content: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                M.LLM_RETRIES.inc()
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 30.0))
            try:
                resp = self.client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:  # connection refused, reset, timeouts
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 200:
                try:
                    return resp.json()["choices"][0]["message"]["content"] or ""
                except (ValueError, KeyError, IndexError, TypeError):
                    raise ValueError(f"judge endpoint answered 200 without a chat completion: {resp.text[:200]}")
            problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code in _REFUSED:
                raise JudgeUnavailable(f"judge endpoint refused model {self.model!r}: {problem}")
            if resp.status_code not in _RETRYABLE and resp.status_code < 500:
                raise ValueError(f"judge endpoint rejected the request: {problem}")
        raise JudgeUnavailable(f"judge endpoint failed {self.retries + 1} times: {problem}")

"""The `human` plugin: client feedback (odpo.feedback) to preference pairs.

The gateway fills each `Feedback` with the prompt and the served texts, so:
- a choice between two responses is a pair at once (the preferred one is chosen);
- a rating of one response waits in a buffer until a rating of the opposite
  sign arrives for the same prompt (a liked against a disliked answer), first
  come first paired; each rating makes at most one pair. Rating 0 says
  nothing about which is better and makes none. Responses to "the same prompt"
  are matched on the prompt's content (its messages or text), not its id, so
  two requests with the same conversation meet whatever ids they got.

The buffer is bounded (prompts, ratings per prompt, age); what falls out
unpaired is counted as evicted. The service commits feedback offsets only
below the oldest rating still buffered, so a restart re-reads, rather than
loses, ratings that were waiting.

A pair's policy version is the older of its two responses' (staleness is
judged by the oldest text in the pair). Human pairs carry no token ids; the
trainer tokenizes them from the texts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

from core.contracts import (
    Feedback,
    PreferencePair,
    PromptEvent,
    ServedResponse,
    pair_id,
)

JUDGE_NAME = "human"
FeedbackDrop = Literal["identical", "margin", "neutral", "evicted"]


def prompt_key(prompt: PromptEvent) -> str:
    """Identity of a prompt's content: same conversation (or text), same key, whatever its id."""
    body = [m.model_dump() for m in prompt.messages] if prompt.messages else prompt.text
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class _Rated:
    prompt: PromptEvent
    response: ServedResponse
    rating: float
    partition: int
    offset: int
    arrived: float


@dataclass
class _PromptRatings:
    liked: deque = field(default_factory=deque)
    disliked: deque = field(default_factory=deque)


def _pair(prompt: PromptEvent, chosen: ServedResponse, rejected: ServedResponse, chosen_score: float | None = None,
          rejected_score: float | None = None) -> PreferencePair:
    version = min(chosen.policy_version, rejected.policy_version)
    margin = None if chosen_score is None or rejected_score is None else chosen_score - rejected_score
    return PreferencePair(id=pair_id(prompt.id, chosen.text, rejected.text, version), prompt=prompt,
                          chosen=chosen.text, rejected=rejected.text, policy_version=version, judge=JUDGE_NAME,
                          chosen_score=chosen_score, rejected_score=rejected_score, margin=margin)


class FeedbackPairer:
    def __init__(self, max_prompts: int = 10_000, max_per_prompt: int = 8, max_age_s: float = 86_400,
                 min_margin: float = 1e-6):
        self.max_prompts, self.max_per_prompt, self.max_age_s = max_prompts, max_per_prompt, max_age_s
        self.min_margin = min_margin
        self._prompts: OrderedDict[str, _PromptRatings] = OrderedDict()

    def __len__(self) -> int:
        """Ratings waiting for a partner."""
        return sum(len(r.liked) + len(r.disliked) for r in self._prompts.values())

    def add(self, fb: Feedback, partition: int = 0, offset: int = 0,
            now: float | None = None) -> tuple[list[PreferencePair], list[FeedbackDrop]]:
        """Pairs this feedback completes, and why it made none; `ValueError` for feedback that cannot be used."""
        if fb.prompt is None or fb.response is None:
            raise ValueError("feedback lacks the served prompt or response text (the gateway fills them)")
        if fb.other_response_id is not None:
            return self._choice(fb)
        now = time.monotonic() if now is None else now
        if fb.rating == 0:  # also withdraws an earlier rating of the same response
            self._withdraw(prompt_key(fb.prompt), fb.response.id)
            return [], ["neutral"]
        return self._rating(_Rated(fb.prompt, fb.response, float(fb.rating), partition, offset, now))

    def _choice(self, fb: Feedback) -> tuple[list[PreferencePair], list[FeedbackDrop]]:
        if fb.other_response is None:
            raise ValueError("a choice lacks the other served response's text (the gateway fills it)")
        this, other = fb.response, fb.other_response
        if this.text == other.text:
            return [], ["identical"]
        chosen, rejected = (this, other) if fb.preferred == "this" else (other, this)
        return [_pair(fb.prompt, chosen, rejected)], []

    def _rating(self, new: _Rated) -> tuple[list[PreferencePair], list[FeedbackDrop]]:
        key = prompt_key(new.prompt)
        self._withdraw(key, new.response.id)  # a re-rated response counts with its newest rating
        ratings = self._prompts.pop(key, None) or _PromptRatings()
        self._prompts[key] = ratings  # most recently rated prompt last
        mine, opposite = (ratings.liked, ratings.disliked) if new.rating > 0 else (ratings.disliked, ratings.liked)
        drops: list[FeedbackDrop] = []
        if not opposite:
            mine.append(new)
            if len(mine) > self.max_per_prompt:
                mine.popleft()
                drops.append("evicted")
            drops += self._bound()
            return [], drops
        partner = opposite.popleft()
        if not ratings.liked and not ratings.disliked:
            del self._prompts[key]
        good, bad = (new, partner) if new.rating > 0 else (partner, new)
        if good.response.text == bad.response.text:
            return [], ["identical"]
        if good.rating - bad.rating < self.min_margin:
            return [], ["margin"]
        return [_pair(good.prompt, good.response, bad.response, good.rating, bad.rating)], []

    def _withdraw(self, key: str, response_id: str) -> None:
        ratings = self._prompts.get(key)
        if ratings is None:
            return
        for q in (ratings.liked, ratings.disliked):
            for old in [r for r in q if r.response.id == response_id]:
                q.remove(old)
        if not ratings.liked and not ratings.disliked:
            del self._prompts[key]

    def _bound(self) -> list[FeedbackDrop]:
        drops: list[FeedbackDrop] = []
        while len(self._prompts) > self.max_prompts:
            _, oldest = self._prompts.popitem(last=False)
            drops += ["evicted"] * (len(oldest.liked) + len(oldest.disliked))
        return drops

    def evict_old(self, now: float | None = None) -> int:
        """Forget ratings older than `max_age_s`; returns how many."""
        now = time.monotonic() if now is None else now
        evicted = 0
        for key in list(self._prompts):
            ratings = self._prompts[key]
            for q in (ratings.liked, ratings.disliked):
                while q and now - q[0].arrived > self.max_age_s:
                    q.popleft()
                    evicted += 1
            if not ratings.liked and not ratings.disliked:
                del self._prompts[key]
        return evicted

    def lowest_offsets(self) -> dict[int, int]:
        """Per partition, the offset of the oldest rating still buffered (commit no further)."""
        low: dict[int, int] = {}
        for ratings in self._prompts.values():
            for r in (*ratings.liked, *ratings.disliked):
                low[r.partition] = min(low.get(r.partition, r.offset), r.offset)
        return low

"""The quality guard: what no rule of a task can be satisfied without.

A rule verifier checks constraints; an online loop then learns the cheapest
text that meets them ("no" is lowercase and has no commas). The guard looks
at the answer itself and fails it, with a reason, when it is:

- `empty`: no words at all;
- `too_short`: fewer than `min_words` words (a one-word answer to "Describe
  the beach." is no answer, whatever the constraints say);
- `repetitive`: one word makes more than `max_word_share` of an answer of at
  least 4 words, or its distinct bigrams are fewer than `min_distinct2` of its
  bigrams (answers of at least 8 words): "the the the", or a phrase looping;
- `off_topic`: the task names its topic's words (an `on_topic` constraint)
  and the answer uses none of them;
- `disfluent`: with a reference scorer, the base model's mean log-probability
  per token of the answer is below `min_ref_logprob` (word salad, broken
  text; a cheap proxy of the KL from the reference policy, computed on the
  judge's side).

A passing answer also gets a soft quality in [0, 1]: its reference
log-probability per token mapped linearly from `min_ref_logprob` (0) to
`good_ref_logprob` (1); 1 without a reference scorer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from judge.verifier import on_topic, topic_words, words

GUARD_REASONS = ("empty", "too_short", "repetitive", "off_topic", "disfluent")


class ReferenceLogprobs(Protocol):
    def logprob_per_token(self, prompt: Any, texts: Sequence[str]) -> list[float]:
        """Mean log-probability per token of each text as the reference model's answer to `prompt`."""
        ...


@dataclass(frozen=True)
class Assessment:
    failure: str | None  # one of GUARD_REASONS, or None when the answer passes
    quality: float  # soft quality in [0, 1] (0 when it fails)
    ref_logprob: float | None


@dataclass(frozen=True)
class GuardLimits:
    min_words: int = 5
    max_word_share: float = 0.5
    min_distinct2: float = 0.5
    off_topic: bool = True
    min_ref_logprob: float = -4.0  # as JudgeSettings.guard_min_ref_logprob
    good_ref_logprob: float = -1.0


def distinct2(ws: Sequence[str]) -> float | None:
    """Distinct bigrams / bigrams of a word list (None under two words)."""
    bigrams = list(zip(ws, ws[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else None


def rule_failure(text: str, task: Any, limits: GuardLimits) -> str | None:
    """The first guard reason that needs no model, or None."""
    ws = [w.lower() for w in words(text)]
    if not ws:
        return "empty"
    if len(ws) < limits.min_words:
        return "too_short"
    if len(ws) >= 4 and Counter(ws).most_common(1)[0][1] / len(ws) > limits.max_word_share:
        return "repetitive"
    d2 = distinct2(ws)
    if len(ws) >= 8 and d2 is not None and d2 < limits.min_distinct2:
        return "repetitive"
    topic = topic_words(task) if limits.off_topic else None
    if topic and not on_topic(text, topic):
        return "off_topic"
    return None


def guard_failure(text: str, task: Any, limits: GuardLimits, ref_logprob: float | None = None) -> str | None:
    """The guard's reason to fail `text` (the rules first, then fluency when a reference scored it), or None."""
    failure = rule_failure(text, task, limits)
    if failure is None and ref_logprob is not None and ref_logprob < limits.min_ref_logprob:
        return "disfluent"
    return failure


class QualityGuard:
    def __init__(self, limits: GuardLimits = GuardLimits(), reference: ReferenceLogprobs | None = None):
        self.limits, self.reference = limits, reference

    def assess(self, prompt: Any, texts: Sequence[str]) -> list[Assessment]:
        """One assessment per text; `prompt` is the PromptEvent they answer."""
        lim = self.limits
        ref: list[float | None] = [None] * len(texts)
        if self.reference is not None:
            scored = [i for i, t in enumerate(texts) if words(t)]  # an empty answer has no tokens to score
            if scored:
                for i, lp in zip(scored, self.reference.logprob_per_token(prompt, [texts[i] for i in scored])):
                    ref[i] = lp
        out = []
        for text, lp in zip(texts, ref):
            f = guard_failure(text, prompt.task, lim, lp)
            if f is not None:
                out.append(Assessment(f, 0.0, lp))
            elif lp is None:
                out.append(Assessment(None, 1.0, None))
            else:
                span = lim.good_ref_logprob - lim.min_ref_logprob
                out.append(Assessment(None, min(1.0, max(0.0, (lp - lim.min_ref_logprob) / span)), lp))
        return out

"""Per-answer evaluation rows and the signals of a set of answers.

A task score alone is what an online loop learns to game, so every set of
answers is described by several numbers at once:

- `score` (mean task score, with a 95% bootstrap interval) and `strict_pass`
  (share of answers meeting every constraint);
- `mean_words` and `empty_share`: collapse to short or empty replies;
- `distinct2`: distinct word bigrams / bigrams over all answers (one answer
  repeated everywhere, or a phrase looping, drives it down);
- `on_topic_share`: answers that name their topic (prompts whose task says it);
- `ref_logprob`: the base model's mean log-probability per token of the
  answers (fluency, and a cheap estimate of the distance from the reference);
- `guard_pass`: share of answers the quality guard passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from judge.quality import GuardLimits, ReferenceLogprobs, guard_failure
from judge.rules import score_task, strict_task
from judge.stats import bootstrap_mean
from judge.verifier import on_topic, topic_words, words

# name -> True when higher is better (the direction a degeneration limit guards)
SIGNALS = {"score": True, "strict_pass": True, "mean_words": True, "empty_share": False, "distinct2": True,
           "on_topic_share": True, "ref_logprob": True, "guard_pass": True}


@dataclass(frozen=True)
class AnswerRow:
    prompt_id: str
    answer: str
    score: float
    strict: bool
    words: int
    on_topic: bool | None
    ref_logprob: float | None
    guard_failure: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def score_answers(prompts: Sequence[Any], answers: Sequence[str], reference: ReferenceLogprobs | None = None,
                  limits: GuardLimits = GuardLimits(), allowed_modules: Sequence[str] = ()) -> list[AnswerRow]:
    """One row per (prompt, answer): task score, strict pass, length, topic, fluency, guard verdict."""
    rows = []
    for p, a in zip(prompts, answers, strict=True):
        topic = topic_words(p.task)
        lp = None
        if reference is not None and words(a):
            lp = reference.logprob_per_token(p, [a])[0]
        failure = guard_failure(a, p.task, limits, lp)
        rows.append(AnswerRow(p.id, a, score_task(p.task, a, allowed_modules), strict_task(p.task, a, allowed_modules),
                              len(words(a)), None if topic is None else on_topic(a, topic), lp, failure))
    return rows


def summarize(rows: Sequence[AnswerRow], seed: int = 0) -> dict:
    """Every signal of a set of answers; `score` and `ref_logprob` also as intervals (`*_ci`)."""
    if not rows:
        raise ValueError("no answers to summarize")
    n = len(rows)
    score = bootstrap_mean([r.score for r in rows], seed=seed)
    strict = bootstrap_mean([float(r.strict) for r in rows], seed=seed)
    bigrams = [bg for r in rows for bg in _bigrams(r.answer)]
    topical = [r.on_topic for r in rows if r.on_topic is not None]
    lps = [r.ref_logprob for r in rows if r.ref_logprob is not None]
    out = {
        "n": n,
        "score": score.mean, "score_ci": score.as_dict(),
        "strict_pass": strict.mean, "strict_pass_ci": strict.as_dict(),
        "mean_words": sum(r.words for r in rows) / n,
        "empty_share": sum(1 for r in rows if r.words == 0) / n,
        "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "on_topic_share": sum(topical) / len(topical) if topical else None,
        "ref_logprob": None, "ref_logprob_ci": None,
        "guard_pass": sum(1 for r in rows if r.guard_failure is None) / n,
    }
    if lps:
        ci = bootstrap_mean(lps, seed=seed)
        out["ref_logprob"], out["ref_logprob_ci"] = ci.mean, ci.as_dict()
    return out


def _bigrams(text: str) -> list[tuple[str, str]]:
    ws = [w.lower() for w in words(text)]
    return list(zip(ws, ws[1:]))

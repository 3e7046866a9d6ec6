"""The composite judge: a plugin's score (rules, reward model, LLM) composed with the quality guard.

`composition` (a judge setting):
- `product` (default): score = plugin score x (1 - w + w x quality). The
  constraints decide the order among fluent answers; the guard's soft quality
  (reference log-probability) scales it, by at most the weight w. A score
  below zero (a reward model's) is scaled the other way, score x (1 + w x
  (1 - quality)), so that lower quality always means a lower score.
- `weighted`: score = (1 - w) x plugin score + w x quality.
- `rules_only`: the plugin alone (no guard): what the loop did before it
  learned that "no" satisfies "lowercase, no commas"; kept for comparison.

Either way, a response the guard fails (empty, too short, repetitive, off
topic, disfluent; judge/quality.py) scores `FAILED_SCORE` (or 1 below the
lowest passing score, when a plugin scores below zero), below every passing
one, and is marked in `Judgement.failures`, so pair construction never makes
it the chosen side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from judge.base import Judge, Judgement
from judge.quality import GuardLimits, QualityGuard
from core.contracts import PromptEvent
from core.settings import JudgeSettings

FAILED_SCORE = -1.0


class CompositeJudge:
    def __init__(self, plugin: Judge, guard: QualityGuard, composition: str = "product", weight: float = 0.25):
        if composition not in ("product", "weighted"):
            raise ValueError(f"unknown composition {composition!r} (product, weighted)")
        self.plugin, self.guard, self.composition, self.weight = plugin, guard, composition, weight
        self.name = plugin.name

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        base = self.plugin.judge(prompt, responses)
        assessed = self.guard.assess(prompt, responses)
        w = self.weight
        passing = []
        for s, a in zip(base.scores, assessed):
            if a.failure is not None:
                continue
            if self.composition == "product":  # s x (1 - w + w x quality) for s >= 0, monotone in quality for s < 0
                passing.append(s - w * (1 - a.quality) * abs(s))
            else:
                passing.append((1 - w) * s + w * a.quality)
        failed = min([FAILED_SCORE] + [p - 1 for p in passing])
        it = iter(passing)
        scores = [failed if a.failure is not None else next(it) for a in assessed]
        return Judgement(scores, base.verdicts, [a.failure for a in assessed])

    def close(self) -> None:
        if hasattr(self.plugin, "close"):
            self.plugin.close()


def guard_from_settings(settings: JudgeSettings, reference_model: Path | None) -> QualityGuard:
    """The guard the settings describe; loads the reference model when `reference_logprob` is on."""
    reference = None
    if settings.reference_logprob:
        if reference_model is None:
            raise ValueError("reference_logprob needs the base model folder (ODPO_BASE_MODEL or the packaged one)")
        from judge.fluency import ReferenceScorer

        reference = ReferenceScorer(reference_model, threads=settings.reference_threads)
    limits = GuardLimits(settings.guard_min_words, settings.guard_max_word_share, settings.guard_min_distinct2,
                         settings.guard_off_topic, settings.guard_min_ref_logprob, settings.guard_good_ref_logprob)
    return QualityGuard(limits, reference)

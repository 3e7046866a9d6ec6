"""The judge plugins' registry: the plugin a setting names, and the configured judge (plugin x quality guard).

Apart from judge/base.py (the protocol every plugin implements), so that a
plugin importing the protocol does not import the registry that imports it.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import JudgeSettings
from judge.base import Judge

SCORING_JUDGES = ("verifier", "reward_model", "llm_judge")


def make_judge(settings: JudgeSettings, reference_model: "Path | None" = None) -> Judge:
    """The configured judge: the plugin `settings.judge` names, composed with the quality guard
    (`settings.composition`; judge/composite.py). `reference_model` is the base model folder the guard's
    fluency term scores with (`settings.reference_logprob`)."""
    plugin = make_plugin(settings)
    if settings.composition == "rules_only":
        return plugin
    from judge.composite import CompositeJudge, guard_from_settings

    return CompositeJudge(plugin, guard_from_settings(settings, reference_model), settings.composition,
                          settings.quality_weight)


def make_plugin(settings: JudgeSettings) -> Judge:
    """The scoring plugin `settings.judge` names (imports only what that plugin needs)."""
    if settings.judge == "verifier":
        from judge.rule_judge import RuleJudge
        return RuleJudge(settings.verifier_callables, settings.regex_timeout_s)
    if settings.judge == "reward_model":
        from judge.reward_model import RewardModelJudge
        if settings.reward_model_path is None:
            raise ValueError("judge=reward_model needs ODPO_JUDGE_REWARD_MODEL_PATH (a local HF model folder)")
        return RewardModelJudge(settings.reward_model_path, device=settings.reward_model_device,
                                batch_size=settings.reward_model_batch_size,
                                max_length=settings.reward_model_max_length, threads=settings.reward_model_threads,
                                dtype=settings.reward_model_dtype)
    if settings.judge == "llm_judge":
        from judge.llm_judge import LlmJudge
        return LlmJudge.from_settings(settings)
    raise ValueError(f"judge {settings.judge!r} does not score candidate sets (known: {', '.join(SCORING_JUDGES)})")

"""The gate's verdict on a scored version: paired score against the promoted one, and no degeneration.

Pure (no I/O). Inputs are per-prompt evaluation rows (judge/signals.py) of
the candidate, the promoted version and base, on the same held-out prompts.

A candidate passes when
1. its task score is not worse than the promoted version's beyond the
   tolerance: the lower end of the 95% bootstrap interval of the paired
   difference (candidate - promoted, same prompts) is above -tolerance; the
   verdict is `conclusive` once that interval's half-width is within the
   tolerance (the gate scores more prompts until it is, up to its maximum);
2. no quality signal is worse than the promoted version's, nor base's,
   beyond its limit (limits below). Comparing with base as well stops a slow
   drift that stays under the limit at every step.
A refusal names the signal (`score` or a signal of `LIMITS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from judge.signals import AnswerRow, summarize
from judge.stats import Interval, paired_difference

# signal -> how its limit reads (the limits themselves are GatewaySettings.limit_*): `relative` = the candidate
# may be lower by at most that share of the reference's value; `absolute` = lower by at most that much;
# `absolute_rise` = higher by at most that much.
LIMITS = {"mean_words": "relative", "empty_share": "absolute_rise", "distinct2": "absolute",
          "on_topic_share": "absolute", "ref_logprob": "absolute", "guard_pass": "absolute"}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    signal: str | None  # what refused it: "score" or a LIMITS key
    reason: str
    difference: Interval | None  # candidate - promoted, paired
    conclusive: bool
    signals: dict


def degradation(candidate: dict, reference: dict, ref_name: str, limits: dict[str, float]) -> tuple[str, str] | None:
    """The first signal of `candidate` worse than `reference`'s beyond its limit: (signal, reason), or None."""
    for signal, kind in LIMITS.items():
        ours, theirs, limit = candidate.get(signal), reference.get(signal), limits[signal]
        if ours is None or theirs is None:
            continue
        if kind == "relative":
            bad, floor = ours < theirs * (1 - limit), f"{1 - limit:.0%} of it"
        elif kind == "absolute":
            bad, floor = ours < theirs - limit, f"{limit:g} below it"
        else:
            bad, floor = ours > theirs + limit, f"{limit:g} above it"
        if bad:
            return signal, f"{signal} {ours:.3f} is worse than {ref_name}'s {theirs:.3f} (limit: {floor})"
    return None


def judge_version(candidate: Sequence[AnswerRow], promoted: Sequence[AnswerRow] | None,
                  base: Sequence[AnswerRow] | None, tolerance: float, limits: dict[str, float],
                  promoted_name: str = "the promoted version") -> Verdict:
    """The verdict on `candidate` (rows on the same first prompts as `promoted` and `base`)."""
    signals = summarize(candidate)
    if not promoted:
        return Verdict(True, None, "nothing scored to compare with", None, True, signals)
    n = len(candidate)
    if len(promoted) != n or (base and len(base) != n):
        raise ValueError("the candidate and its references must be scored on the same prompts")
    diff = paired_difference([r.score for r in candidate], [r.score for r in promoted])
    conclusive = diff.half_width <= tolerance
    signals["score_difference"] = diff.as_dict()
    for ref_rows, ref_name in ((promoted, promoted_name), (base, "base")):
        if not ref_rows or ref_rows is candidate:
            continue
        bad = degradation(signals, summarize(ref_rows), ref_name, limits)
        if bad:
            return Verdict(False, bad[0], bad[1], diff, conclusive, signals)
    if diff.low < -tolerance:
        return Verdict(False, "score", f"held-out score {signals['score']:.4f} is below {promoted_name}'s by "
                       f"{-diff.mean:.4f} (95% interval of the paired difference {diff.low:+.4f}..{diff.high:+.4f}, "
                       f"{n} prompts; tolerance {tolerance:g}"
                       f"{'' if conclusive else '; the interval is still wider than the tolerance'})",
                       diff, conclusive, signals)
    return Verdict(True, None, "", diff, conclusive, signals)

"""From a scored candidate set to one preference pair: the best sample against the worst.

Best-vs-worst gives the widest margin a set offers, and one pair per set
keeps the trainer's windows spread over many prompts. Sets whose samples all
read the same are dropped as `identical`; sets whose best and worst score
within `min_margin` of each other are dropped as `tie` (the judge has no
preference to teach).
"""

from __future__ import annotations

from typing import Literal, Sequence

from service.contracts import CandidateSet, PreferencePair, pair_id

DropReason = Literal["tie", "identical"]
DROP_REASONS: tuple[DropReason, ...] = ("tie", "identical")


def best_and_worst(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the highest and the lowest score; the first one wins among equals (deterministic)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def make_pair(cset: CandidateSet, scores: Sequence[float], judge: str,
              min_margin: float) -> tuple[PreferencePair | None, DropReason | None]:
    """The best-vs-worst pair of `cset` under `scores` (one per completion), or None and why not."""
    if len(scores) != len(cset.completions):
        raise ValueError(f"{len(scores)} scores for {len(cset.completions)} completions")
    if len({c.text for c in cset.completions}) == 1:
        return None, "identical"
    b, w = best_and_worst(scores)
    margin = float(scores[b]) - float(scores[w])
    if margin < min_margin or margin <= 0:
        return None, "tie"
    chosen, rejected = cset.completions[b], cset.completions[w]
    if chosen.text == rejected.text:  # a judge that scores by more than the text could still do this
        return None, "identical"
    pair = PreferencePair(
        id=pair_id(cset.prompt.id, chosen.text, rejected.text, cset.policy_version),
        prompt=cset.prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        prompt_token_ids=list(cset.prompt_token_ids),
        chosen_token_ids=list(chosen.token_ids),
        rejected_token_ids=list(rejected.token_ids),
        chosen_logprobs=list(chosen.logprobs),
        rejected_logprobs=list(rejected.logprobs),
        policy_version=cset.policy_version,
        judge=judge,
        chosen_score=float(scores[b]),
        rejected_score=float(scores[w]),
        margin=margin,
    )
    return pair, None

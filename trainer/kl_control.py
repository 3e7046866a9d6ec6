"""A drift budget for the rolling updates: DPO's beta adapted to how far the policy has moved (a KL controller).

DPO's beta prices moving away from the reference, but one fixed price over
hours of windows lets the drift add up: the promoted version's reference
log-prob fell about 0.02 nats/token per version until the gate's drift limit
refused every later version. With `kl_target` set, the trainer measures the
drift of the versions that sampled each window and moves beta towards keeping
it at the target, as the adaptive KL controller of Ziegler et al. (2019) does
for PPO:

    drift = mean over the window's sampled responses of
            (log pi_s(y) - log pi_ref(y)) / tokens(y),   y sampled by pi_s
    beta <- clip(beta * (1 + clip((drift - target) / target, -0.2, +0.5)), beta_min, beta_max)

log pi_s(y) is what the sampler reported for its own tokens (the pair carries
it) and log pi_ref(y) the trainer's reference pass, so `drift` is an unbiased
estimate of KL(pi_s || pi_ref) per token for the served versions (at most
`max_staleness` behind; only the newest of them in the window counts, so the
controller lags as little as it can). The trainer's current weights would not do: scored on
responses of earlier versions, which DPO has since pushed down, the log-ratio
comes out negative and the controller would cheapen every step. Pairs
without the sampler's log-probs (loaded datasets, human feedback) measure
nothing; a window of only those leaves beta as it is.
Beta rises while the policy is beyond its budget (each further step costs
more) and falls back while it is within, so learning goes on where it is
cheap instead of stopping at the gate. It brakes faster than it releases
(+50% a window at most, -20%): measured over a 60-minute run, drift grew
0.15 -> 0.40 -> 0.68 nats/token in three windows while a symmetric 20% step
moved beta 0.18 -> 0.31, and the gate refused the versions on it. The beta in force is kept in each
version's trainer state, so a restarted trainer continues with it.
"""

from __future__ import annotations

import math

MAX_RAISE = 0.5  # most relative rise of beta per window (over budget)
MAX_CUT = 0.2  # most relative fall per window (within budget)


def drift_per_token(pairs, ref) -> float | None:
    """Mean per-token log-ratio sampler/reference of the responses the newest sampling version of `pairs`
    sampled (None: none carry the sampler's log-probs). `ref`: pair id -> [2] reference log-prob sums."""
    measured = [p for p in pairs if p.pair_id in ref and (p.chosen_logprobs or p.rejected_logprobs)]
    newest = max((p.policy_version for p in measured), default=None)
    ratios = []
    for p in measured:
        if p.policy_version != newest:  # older versions' drift is old news: the controller would lag
            continue
        r = ref[p.pair_id].float().cpu()
        sides = ((p.chosen_ids, p.chosen_logprobs), (p.rejected_ids, p.rejected_logprobs))
        for side, (ids, sampled) in enumerate(sides):
            if sampled and len(sampled) == len(ids):
                ratios.append((sum(sampled) - r[side].item()) / len(ids))
    ratios = [x for x in ratios if math.isfinite(x)]
    return sum(ratios) / len(ratios) if ratios else None


def next_beta(beta: float, drift: float | None, target: float, beta_min: float, beta_max: float) -> float:
    """Beta for the next window: up while drift exceeds the target, down while below (off for target 0)."""
    if target <= 0 or drift is None:
        return beta
    error = max(-MAX_CUT, min(MAX_RAISE, (drift - target) / target))
    return max(beta_min, min(beta_max, beta * (1 + error)))

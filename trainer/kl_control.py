"""A drift budget for the rolling updates: DPO's beta adapted to how far the policy has moved (a KL controller).

DPO's beta prices moving away from the reference, but one fixed price over
hours of windows lets the drift add up: the promoted version's reference
log-prob fell about 0.02 nats/token per version until the gate's drift limit
refused every later version. With `kl_target` set, the trainer measures the
drift at the start of each window and moves beta towards keeping it at the
target, as the adaptive KL controller of Ziegler et al. (2019) does for PPO:

    drift = mean over the window's responses of (log pi(y) - log pi_ref(y)) / tokens(y)
    beta <- clip(beta * (1 + clip((drift - target) / target, -0.2, 0.2)), beta_min, beta_max)

The responses were sampled by the policy (on-policy pairs, at most
`max_staleness` versions old), so `drift` estimates KL(pi || pi_ref) per
token; it is read off the window's first step, before that window's update.
Beta rises while the policy is beyond its budget (each further step costs
more) and falls back while it is within, so learning goes on where it is
cheap instead of stopping at the gate. The beta in force is kept in each
version's trainer state, so a restarted trainer continues with it.
"""

from __future__ import annotations

import math

MAX_CHANGE = 0.2  # most relative change of beta per window


def drift_per_token(outs, ref) -> float | None:
    """Mean per-token log-ratio policy/reference of the responses of one step's outputs (None when empty)."""
    ratios = []
    for _, scored, batch in outs:
        pol = scored.logps.detach().float().cpu()
        lengths = scored.lengths.float().cpu()
        for i, p in enumerate(batch):
            r = ref[p.pair_id].float().cpu()
            for side in (0, 1):
                if lengths[i, side] > 0:
                    ratios.append(((pol[i, side] - r[side]) / lengths[i, side]).item())
    ratios = [x for x in ratios if math.isfinite(x)]
    return sum(ratios) / len(ratios) if ratios else None


def next_beta(beta: float, drift: float | None, target: float, beta_min: float, beta_max: float) -> float:
    """Beta for the next window: up while drift exceeds the target, down while below (off for target 0)."""
    if target <= 0 or drift is None:
        return beta
    error = max(-MAX_CHANGE, min(MAX_CHANGE, (drift - target) / target))
    return max(beta_min, min(beta_max, beta * (1 + error)))

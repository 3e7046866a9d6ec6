"""Learning rate by optimizer step: warmup, then constant, linear or cosine decay (transformers' formulas).

The step count is global (kept in the trainer state), so a resumed or streaming
trainer continues its schedule where it stopped. After `decay_steps` the rate
stays at `min_lr_ratio` x the peak: a streaming trainer never runs out of steps.
"""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, kind: str = "constant", warmup_steps: int = 0, decay_steps: int = 0,
          min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup rises as `step / warmup_steps` (step 0 trains at 0, as in transformers); then
    `linear`/`cosine` go from `peak` at `warmup_steps` to `min_lr_ratio * peak` at `decay_steps`
    (counted from step 0, like transformers' `num_training_steps`) and stay there.
    """
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    if kind == "constant":
        return peak
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        factor = 1.0 - progress
    elif kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_scheduler {kind!r}")
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)

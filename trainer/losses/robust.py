"""Robust DPO: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"
(arXiv:2403.00409)."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def robust(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = ((1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))) / (1 - 2 eps),

    an unbiased estimate of the clean DPO loss when each label is flipped with probability
    eps = label_smoothing < 0.5 (the paper suggests 0.1).
    """
    z = p.beta * b.margin
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)

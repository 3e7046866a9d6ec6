"""DiscoPOP: Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
Models" (arXiv:2406.08414), Eq. 5 (the log-ratio modulated loss)."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def discopop(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = (1 - m) (-log sigma(z)) + m exp(-z), z = beta h, m = sigma(z / tau), tau = discopop_tau.

    A blend of the logistic (DPO) and exponential losses, switched by the sign of the margin.
    """
    z = p.beta * b.margin
    m = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m

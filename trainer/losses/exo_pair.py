"""EXO (pairwise): Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment"
(arXiv:2402.00856), Eq. 16 with K = 2."""

import math

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def exo_pair(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = KL(q || p_eps), q = softmax(beta h_w, beta h_l), p_eps = (1 - eps, eps):

        L = sigma(beta h) (log sigma(beta h) - log(1 - eps)) + sigma(-beta h) (log sigma(-beta h) - log eps).

    eps = label_smoothing must be > 0 (the paper uses 1e-3); at 0 the loss is infinite.
    """
    z = p.beta * b.margin
    eps = p.label_smoothing
    log_eps = math.log(eps) if eps > 0 else -math.inf
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - log_eps))

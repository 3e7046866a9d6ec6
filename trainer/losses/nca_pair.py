"""NCA (pairwise): Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"
(arXiv:2402.05369)."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def nca_pair(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l), r = beta (log pi - log ref).

    Unlike DPO it scores each side against the reference on its own, so it does not lower the
    chosen likelihood while widening the margin.
    """
    r_w, r_l = p.beta * b.chosen_logratios, p.beta * b.rejected_logratios
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)

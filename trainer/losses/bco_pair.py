"""BCO (pairwise): Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"
(arXiv:2404.04656), without the running reward shift (TRL's `bco_pair`)."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def bco_pair(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = -log sigma(r_w) - log sigma(-r_l), r = beta (log pi - log ref): chosen classified as
    good, rejected as bad, each on its own."""
    return -F.logsigmoid(p.beta * b.chosen_logratios) - F.logsigmoid(-p.beta * b.rejected_logratios)

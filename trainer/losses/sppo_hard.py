"""SPPO (hard labels): Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment"
(arXiv:2405.00675), Eq. 4.7 with P(y_w > y_l) set to 1 for the winner and 0 for the loser."""

import torch

from trainer.losses.base import LossParams, PairLogps


def sppo_hard(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2, h = log pi - log ref of each side."""
    return (b.chosen_logratios - 0.5 / p.beta) ** 2 + (b.rejected_logratios + 0.5 / p.beta) ** 2

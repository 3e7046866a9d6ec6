"""APO: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions"
(arXiv:2408.06266), Eqs. 7 (zero) and 8 (down)."""

import torch

from trainer.losses.base import LossParams, PairLogps


def apo_zero(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = (1 - sigma(r_w)) + sigma(r_l), r = beta (log pi - log ref).

    For chosen answers better than the model's own: raise chosen and lower rejected likelihood.
    """
    return (1 - torch.sigmoid(p.beta * b.chosen_logratios)) + torch.sigmoid(p.beta * b.rejected_logratios)


def apo_down(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = sigma(r_w) + (1 - sigma(r_w - r_l)).

    For chosen answers worse than the model's own: lower both, rejected more.
    """
    r_w = p.beta * b.chosen_logratios
    return torch.sigmoid(r_w) + (1 - torch.sigmoid(p.beta * (b.chosen_logratios - b.rejected_logratios)))

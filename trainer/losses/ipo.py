"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"
(arXiv:2310.12036), Eq. 17, with TRL's per-token normalisation."""

import torch

from trainer.losses.base import LossParams, PairLogps


def ipo(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = (h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2, h = log pi - log ref of each side.

    Each side's log-ratio is divided by its completion length (as TRL does, confirmed with the
    IPO authors), so beta (tau in the paper) means the same for short and long completions.
    """
    chosen = b.chosen_logratios / b.chosen_tokens.clamp(min=1)
    rejected = b.rejected_logratios / b.rejected_tokens.clamp(min=1)
    return (chosen - rejected - 1 / (2 * p.beta)) ** 2

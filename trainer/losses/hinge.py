"""Hinge (SLiC): Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"
(arXiv:2305.10425); RSO, Liu et al. 2023 (arXiv:2309.06657), uses the same loss."""

import torch

from trainer.losses.base import LossParams, PairLogps


def hinge(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = max(0, 1 - beta h), h the log-ratio margin; beta is 1/delta of the paper's margin delta."""
    return torch.relu(1 - p.beta * b.margin)

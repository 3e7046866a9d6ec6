"""AOT (paired): Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"
(arXiv:2406.05882)."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def aot(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L_i = -(1 - eps) log sigma(beta d_i) - eps log sigma(-beta d_i), d = sort(rho) - sort(rho_ref),

    rho = log pi(y_w) - log pi(y_l) and rho_ref the same under the reference, each sorted over
    the batch: the loss aligns the two distributions (first-order stochastic dominance), not pairs.
    It therefore depends on which pairs share a batch: odpo sorts within a micro-batch
    (`batch_pairs`), TRL within its per-device batch.
    """
    rho, _ = torch.sort(b.policy_chosen - b.policy_rejected, dim=0)
    rho_ref, _ = torch.sort(b.ref_chosen - b.ref_rejected, dim=0)
    z = p.beta * (rho - rho_ref)
    return -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)

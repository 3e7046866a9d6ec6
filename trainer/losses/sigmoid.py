"""DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
(arXiv:2305.18290), with the conservative label smoothing of Mitchell 2023 ("cDPO")."""

import torch
import torch.nn.functional as F

from trainer.losses.base import LossParams, PairLogps


def sigmoid(b: PairLogps, p: LossParams) -> torch.Tensor:
    r"""L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), eps = label_smoothing
    (the assumed probability that the label is flipped). With eps = 0 (the default) this is TRL
    1.16's `loss_type="sigmoid"` exactly; TRL 1.16 applies label smoothing only to robust, exo_pair
    and aot, where older TRL releases also smoothed sigmoid like this.
    """
    z = p.beta * b.margin
    return -(1 - p.label_smoothing) * F.logsigmoid(z) - p.label_smoothing * F.logsigmoid(-z)

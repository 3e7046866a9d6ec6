"""The SFT term of RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv:2404.19733).

L = L_pref + alpha * NLL(y_w | x), NLL = -(sum of the chosen tokens' log-probs) / (number of chosen
tokens), averaged over the tokens of the whole batch as TRL 1.16 does for `loss_type="sft"`
(combined with `loss_weights=[1, alpha]`). alpha = `TrainerSettings.rpo_alpha`; 0 disables it.
"""

import torch

from trainer.losses.base import PairLogps


def nll_sum(b: PairLogps) -> torch.Tensor:
    """-sum of the chosen log-probs; divided by the step's chosen tokens in `LossOutput.objective`."""
    return -b.policy_chosen.sum()

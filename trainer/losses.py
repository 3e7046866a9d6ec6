"""DPO losses over summed log-probs, one small pure function per loss type.

Every loss takes the policy's and the reference's summed completion
log-probs of chosen and rejected ([pairs] tensors) and returns per-pair
losses plus the implicit rewards. `LOSSES` maps `TrainerSettings.loss_type`
to the function; new types are added beside `sigmoid_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs], beta * (policy - reference) logp of chosen
    rejected_rewards: torch.Tensor  # [pairs]


def sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    r"""DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".

    With h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)) and
    label smoothing eps (the conservative DPO of Mitchell 2023, eps = assumed
    probability that the preference label is flipped):

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    Rewards are r_w = beta * (log pi(y_w|x) - log ref(y_w|x)) and likewise r_l.
    Same numbers as TRL's `loss_type="sigmoid"` with `label_smoothing`.
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    return LossOutput(losses, beta * (policy_chosen - ref_chosen).detach(),
                      beta * (policy_rejected - ref_rejected).detach())


LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {"sigmoid": sigmoid_loss}


def reward_metrics(out: LossOutput) -> dict[str, float]:
    """Means over the pairs: chosen/rejected rewards, their margin, and how often chosen wins."""
    chosen, rejected = out.chosen_rewards.float(), out.rejected_rewards.float()
    return {
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
    }

"""The DPO loss family: one small pure function per loss type, all over the same summed log-probs.

Every loss maps the policy's and the reference's summed completion log-probs
of chosen and rejected (a `PairLogps` of [pairs] tensors) to per-pair losses;
`LOSSES` maps `TrainerSettings.loss_type` to it. `dpo_loss` adds what all
types share: the implicit rewards r = beta * (log pi - log ref) that TRL
logs for every type, and the optional SFT term of RPO (`sft.nll_sum`).
Each module's docstring holds its formula and paper; the numbers equal TRL
1.16's `DPOTrainer` for the same type (tests/test_trainer_vs_trl.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.losses.aot import aot
from trainer.losses.apo import apo_down, apo_zero
from trainer.losses.base import LossParams, PairLogps
from trainer.losses.bco_pair import bco_pair
from trainer.losses.discopop import discopop
from trainer.losses.exo_pair import exo_pair
from trainer.losses.hinge import hinge
from trainer.losses.ipo import ipo
from trainer.losses.nca_pair import nca_pair
from trainer.losses.robust import robust
from trainer.losses.sft import nll_sum
from trainer.losses.sigmoid import sigmoid
from trainer.losses.sppo_hard import sppo_hard

__all__ = ["LOSSES", "LossOutput", "LossParams", "PairLogps", "dpo_loss", "reward_metrics"]

LossFn = Callable[[PairLogps, LossParams], torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid, "ipo": ipo, "hinge": hinge, "robust": robust, "exo_pair": exo_pair,
    "nca_pair": nca_pair, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "aot": aot,
    "apo_zero": apo_zero, "apo_down": apo_down, "discopop": discopop,
}


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # [pairs], the preference loss of each pair
    nll_sum: torch.Tensor  # scalar: -sum of the policy's chosen token log-probs (the SFT term's numerator)
    chosen_rewards: torch.Tensor  # [pairs], beta * (policy - reference) logp of chosen; no gradient
    rejected_rewards: torch.Tensor  # [pairs]

    def objective(self, step_pairs: int, step_chosen_tokens: int, rpo_alpha: float) -> torch.Tensor:
        """This micro-batch's share of a step's loss: mean pair loss + rpo_alpha * chosen NLL per token.

        Both terms are divided by the whole step's counts, so summing the shares of a step's
        micro-batches gives exactly the loss of one batch holding all of them (TRL's
        `loss_type=[type, "sft"]`, `loss_weights=[1, rpo_alpha]`).
        """
        out = self.losses.sum() / step_pairs
        if rpo_alpha:
            out = out + rpo_alpha * self.nll_sum / max(step_chosen_tokens, 1)
        return out


def dpo_loss(logps: PairLogps, params: LossParams, loss_type: str) -> LossOutput:
    """Per-pair losses of `loss_type`, the chosen NLL and the rewards, for one batch of pairs."""
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; one of {sorted(LOSSES)}") from None
    beta = params.beta
    return LossOutput(fn(logps, params), nll_sum(logps),
                      beta * logps.chosen_logratios.detach(), beta * logps.rejected_logratios.detach())


def reward_metrics(out: LossOutput) -> dict[str, float]:
    """TRL's rewards/*: means over the pairs of chosen/rejected rewards, their margin, how often chosen wins."""
    chosen, rejected = out.chosen_rewards.float(), out.rejected_rewards.float()
    return {
        "reward_chosen": chosen.mean().item(),
        "reward_rejected": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
    }

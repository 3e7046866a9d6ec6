"""What every loss reads: summed completion log-probs of both sides under policy and reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairLogps:
    """[pairs] tensors; `policy_*` carry the gradient, `ref_*` never do."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # completion lengths (IPO normalises by them; the SFT term divides by their sum)
    rejected_tokens: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), TRL's `delta_score`."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid (cDPO), robust, exo_pair (its epsilon), aot
    discopop_tau: float = 0.05

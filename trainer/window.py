"""What one rolling update measured: `WindowResult`, filled step by step as TRL logs its metrics.

Losses, rewards, logps and logits are those of the last optimizer step taken
(computed before its update), averaged like TRL's DPOTrainer logs them; the
sampler agreement is measured before any update of the window.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from core.contracts import TrainMetrics
from trainer.logps import Scored
from trainer.losses import LossOutput, reward_metrics


@dataclass
class WindowResult:
    """What one rolling update did; losses, rewards, logps are those of the last step taken (before its update)."""

    pairs: int
    steps: int = 0
    skipped: int = 0
    loss: float = math.nan
    loss_first: float = math.nan
    reward_margin: float = math.nan
    reward_accuracy: float = math.nan
    reward_chosen: float = math.nan
    reward_rejected: float = math.nan
    logps_chosen: float = math.nan  # TRL's logps/* and logits/*: mean summed logp, mean logit per token
    logps_rejected: float = math.nan
    logits_chosen: float = math.nan
    logits_rejected: float = math.nan
    grad_norm: float = math.nan  # before clipping
    learning_rate: float = math.nan
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)  # of every step taken, in order
    logprob_mismatch: list[float] = field(default_factory=list)  # per on-policy pair: mean |ours - sampler's|
    drift: float = math.nan  # mean per-token log-ratio sampler/reference of the window's responses (kl_control)
    beta: float = math.nan  # the DPO beta this window trained with
    restored: bool = False  # the weights went non-finite and were put back
    aborted: bool = False  # stopped early on request; the weights were put back

    @property
    def publishable(self) -> bool:
        return self.steps > 0 and not (self.restored or self.aborted)

    def metrics(self) -> dict[str, float]:
        out = asdict(self)
        out.pop("step_seconds")
        out.pop("step_losses")
        mismatch = out.pop("logprob_mismatch")
        if mismatch:
            out["logprob_mismatch"] = sum(mismatch) / len(mismatch)
        if not math.isfinite(self.drift):  # nothing measured (no sampler log-probs): absent, as NaN != NaN
            out.pop("drift")
        out["restored"], out["aborted"] = float(self.restored), float(self.aborted)
        return out

    def train_metrics(self) -> TrainMetrics:
        m = self.metrics()
        core = {k: m.pop(k) for k in ("loss", "reward_margin", "reward_accuracy", "steps")}
        return TrainMetrics(**core, **m)


def compare_with_sampler(outs, version: int, result: WindowResult, compared: set[str]) -> None:
    """Mean |trainer - sampler| per-token log-prob of each on-policy pair carrying the sampler's log-probs."""
    for _, scored, batch in outs:
        for p, (lp_c, lp_r) in zip(batch, scored.token_logps):
            if p.chosen_logprobs is None or p.policy_version != version or p.pair_id in compared:
                continue
            sampler = torch.tensor(p.chosen_logprobs + p.rejected_logprobs, dtype=torch.float32)
            diff = (torch.cat([lp_c, lp_r]).float().cpu() - sampler).abs().mean().item()
            if math.isfinite(diff):
                compared.add(p.pair_id)
                result.logprob_mismatch.append(diff)


def record_step(result: WindowResult, loss: float, outs, grad_norm: float, lr: float) -> None:
    """Fold one optimizer step's outputs into the window's result (TRL's logged metrics of that step)."""
    merged = merge_outputs([o for o, _, _ in outs])
    scored = [s for _, s, _ in outs]
    logps = torch.cat([s.logps.detach().float().cpu() for s in scored])
    logit_sums = torch.cat([s.mean_logit_sums for s in scored]).sum(0)
    tokens = torch.cat([s.lengths for s in scored]).sum(0).clamp(min=1)
    result.steps += 1
    result.loss = loss
    result.step_losses.append(loss)
    if result.steps == 1:
        result.loss_first = loss
    result.logps_chosen, result.logps_rejected = logps.mean(0).tolist()
    result.logits_chosen, result.logits_rejected = (logit_sums / tokens).tolist()
    result.grad_norm, result.learning_rate = grad_norm, lr
    for k, v in reward_metrics(merged).items():
        setattr(result, k, v)


def detached(outs) -> list:
    """A step's outputs as `record_step` reads them, detached on the CPU, for gathering from other ranks."""
    def cpu(t):
        return t.detach().cpu() if isinstance(t, torch.Tensor) else t

    return [(LossOutput(cpu(o.losses), cpu(o.nll_sum), cpu(o.chosen_rewards), cpu(o.rejected_rewards)),
             Scored(cpu(s.logps), [], cpu(s.mean_logit_sums), cpu(s.lengths)), []) for o, s, _ in outs]


def merge_outputs(outs: list[LossOutput]) -> LossOutput:
    """One LossOutput of several micro-batches."""
    return LossOutput(torch.cat([o.losses for o in outs]), sum(o.nll_sum for o in outs),
                      torch.cat([o.chosen_rewards for o in outs]), torch.cat([o.rejected_rewards for o in outs]))

"""The streaming DPO recipe: one explicit rolling update of the LoRA policy over a window of pairs.

One update (`Trainer.train_window`):
1. reference log-probs of every pair, once (adapter disabled, no grad);
2. `steps_per_window` AdamW steps; each step accumulates the gradient of the
   mean window loss over micro-batches of `batch_pairs` pairs (chosen and
   rejected of a micro-batch share one forward), clips its norm and steps;
3. a step whose loss or gradient norm is not finite is skipped and counted;
   if the weights still end non-finite they are restored to the window's start.
Then `publish_version` writes version N+1 into the store. Kafka lives in
`trainer.service`; this module also serves offline training and tests.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from service.contracts import PreferencePair, TrainMetrics
from service.settings import TrainerSettings
from trainer.checkpoint import (
    Checkpoint,
    TrainerState,
    latest_checkpoint,
    load_optimizer_state,
    new_state,
    save_checkpoint,
)
from trainer.logps import pair_logps, reference_logps
from trainer.losses import LOSSES, LossOutput, reward_metrics
from trainer.model import Policy, load_policy
from trainer.tokenize import TokenizedPair, tokenize_pair

log = logging.getLogger(__name__)


class NonFiniteWeights(RuntimeError):
    """The adapter holds NaN/inf: it must never be published."""


@dataclass
class WindowResult:
    """What one rolling update did; `loss`/rewards are those of the last step taken (before its update)."""

    pairs: int
    steps: int = 0
    skipped: int = 0
    loss: float = math.nan
    loss_first: float = math.nan
    reward_margin: float = math.nan
    reward_accuracy: float = math.nan
    reward_chosen: float = math.nan
    reward_rejected: float = math.nan
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    restored: bool = False  # the weights went non-finite and were put back
    aborted: bool = False  # stopped early on request; the weights were put back

    @property
    def publishable(self) -> bool:
        return self.steps > 0 and not (self.restored or self.aborted)

    def metrics(self) -> dict[str, float]:
        out = asdict(self)
        out.pop("step_seconds")
        out["restored"], out["aborted"] = float(self.restored), float(self.aborted)
        return out

    def train_metrics(self) -> TrainMetrics:
        m = self.metrics()
        core = {k: m.pop(k) for k in ("loss", "reward_margin", "reward_accuracy")}
        return TrainMetrics(**core, steps=self.steps, **{k: v for k, v in m.items() if k != "steps"})


class Trainer:
    """The policy, its optimizer and the trainer state of the newest version; one rolling update at a time."""

    def __init__(self, policy: Policy, settings: TrainerSettings, state: TrainerState | None = None):
        self.policy, self.settings = policy, settings
        self.state = state or TrainerState(base_model=policy.base_model)
        self.loss_fn = LOSSES[settings.loss_type]
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self._trained = set(self.state.trained_ids)

    @classmethod
    def open(cls, model_dir: Path, settings: TrainerSettings, store: Path | None = None,
             device: torch.device | None = None) -> Trainer:
        """A trainer resumed from the newest version in `store`, or a fresh LoRA (version 0)."""
        found = latest_checkpoint(store) if store is not None else None
        if found is None:
            return cls(load_policy(model_dir, settings, device=device), settings)
        ckpt, state = found
        trainer = cls(load_policy(model_dir, settings, adapter_dir=ckpt.path, device=device), settings, state)
        if not load_optimizer_state(ckpt.path, trainer.optimizer):
            log.warning("%s has no optimizer state; AdamW restarts its moments", ckpt.path)
        log.info("resumed at version %d (%d pairs trained)", state.version, state.pairs_trained)
        return trainer

    @property
    def version(self) -> int:
        return self.state.version

    def already_trained(self, pair_id: str) -> bool:
        return pair_id in self._trained

    def tokenize(self, pair: PreferencePair) -> TokenizedPair:
        return tokenize_pair(pair, self.policy.tokenizer, self.settings.max_length, self.policy.vocab_size)

    def _batches(self, pairs: Sequence[TokenizedPair]) -> list[list[TokenizedPair]]:
        # The window gradient does not depend on how pairs are grouped; grouping by length cuts padding.
        ordered = sorted(pairs, key=lambda p: p.n_tokens)
        n = self.settings.batch_pairs
        return [ordered[i : i + n] for i in range(0, len(ordered), n)]

    def _loss(self, batch: Sequence[TokenizedPair], ref: dict[str, torch.Tensor]) -> LossOutput:
        pol = pair_logps(self.policy.model, batch, self.policy.device, self.policy.pad_id)
        rf = torch.stack([ref[p.pair_id] for p in batch])
        return self.loss_fn(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], beta=self.settings.beta,
                            label_smoothing=self.settings.label_smoothing)

    def _reference(self, batches: list[list[TokenizedPair]]) -> dict[str, torch.Tensor]:
        ref: dict[str, torch.Tensor] = {}
        for batch in batches:
            out = reference_logps(self.policy.model, batch, self.policy.device, self.policy.pad_id, len(batch))
            ref.update({p.pair_id: out[i] for i, p in enumerate(batch)})
        return ref

    def train_window(self, pairs: Sequence[TokenizedPair],
                     should_stop: Callable[[], bool] | None = None) -> WindowResult:
        """One rolling update over `pairs` (distinct ids); the policy's weights change in place.

        `should_stop` is asked before each step; when it says yes the window is abandoned and the
        weights put back, so a stopping service never publishes half an update.
        """
        t0 = time.perf_counter()
        result = WindowResult(pairs=len(pairs))
        if not pairs:
            return result
        params = self.policy.trainable_parameters()
        snapshot = [p.detach().clone() for p in params]
        opt_snapshot = copy.deepcopy(self.optimizer.state_dict())
        batches = self._batches(pairs)
        ref = self._reference(batches)
        model = self.policy.model
        model.train()
        for _ in range(self.settings.steps_per_window):
            if should_stop is not None and should_stop():
                result.aborted = True
                break
            ts = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            outs, finite = [], True
            for batch in batches:
                out = self._loss(batch, ref)
                loss = out.losses.sum() / len(pairs)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                outs.append(out)
            if finite:
                norm = torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
                finite = bool(torch.isfinite(norm))
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                result.skipped += 1
                log.warning("non-finite loss or gradient at version %d: step skipped", self.version)
                continue
            self.optimizer.step()
            self._record(result, outs)
            result.step_seconds.append(time.perf_counter() - ts)
        self.optimizer.zero_grad(set_to_none=True)
        model.eval()
        if result.aborted or not self.weights_finite():
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
            self.optimizer.load_state_dict(opt_snapshot)
            if not result.aborted:
                result.restored = True
                log.error("weights went non-finite at version %d: restored the window's start", self.version)
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _record(result: WindowResult, outs: list[LossOutput]) -> None:
        merged = _merge(outs)
        result.steps += 1
        result.loss = merged.losses.mean().item()
        if result.steps == 1:
            result.loss_first = result.loss
        for k, v in reward_metrics(merged).items():
            setattr(result, k, v)

    @torch.no_grad()
    def evaluate(self, pairs: Sequence[TokenizedPair]) -> dict[str, float]:
        """Mean loss and rewards of the current policy on `pairs`, without training."""
        batches = self._batches(pairs)
        ref = self._reference(batches)
        self.policy.model.eval()
        merged = _merge([self._loss(b, ref) for b in batches])
        return {"loss": merged.losses.mean().item(), **reward_metrics(merged)}

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.policy.trainable_parameters())

    def publish_version(self, store: Path, pair_ids: Sequence[str], result: WindowResult,
                        offsets: dict[str, int] | None = None) -> Checkpoint:
        """Write version N+1 (adapter, state with `pair_ids` in the ledger, optimizer) into the store."""
        if not self.weights_finite():
            raise NonFiniteWeights(f"refusing to publish version {self.version + 1}: non-finite LoRA weights")
        state = new_state(self.state, list(pair_ids), offsets or {}, result.metrics())
        ckpt = save_checkpoint(store, self.policy.model, self.optimizer, state)
        self.state = state
        self._trained.update(pair_ids)
        return ckpt


def _merge(outs: list[LossOutput]) -> LossOutput:
    return LossOutput(torch.cat([o.losses for o in outs]), torch.cat([o.chosen_rewards for o in outs]),
                      torch.cat([o.rejected_rewards for o in outs]))


def train_window(trainer: Trainer, pairs: Sequence[TokenizedPair],
                 should_stop: Callable[[], bool] | None = None) -> WindowResult:
    """Module-level form of `Trainer.train_window`, for callers that hold a trainer."""
    return trainer.train_window(pairs, should_stop)

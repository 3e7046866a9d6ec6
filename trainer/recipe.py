"""The streaming DPO recipe: one explicit rolling update of the LoRA policy over a window of pairs.

One update (`Trainer.train_window`):
1. reference log-probs of every pair, once (adapter disabled, no grad);
2. `steps_per_window` AdamW steps; each takes the next `step_pairs` pairs of
   the window (all of them by default), cycling through it pass after pass,
   accumulates the gradient of the step's mean loss over micro-batches of
   `batch_pairs`, clips its norm, sets the scheduled learning rate and steps;
3. a step whose loss or gradient norm is not finite is skipped and counted;
   if the weights still end non-finite they are restored to the window's start.
Before the first update, the policy IS the version that sampled on-policy
pairs: their per-token log-probs are compared with the sampler's then.
`publish_version` writes version N+1 into the store. Kafka lives in
`trainer.service`, files in `trainer.offline`; this module serves both.
Under torchrun every rank runs `train_window` on the same window and takes its
own shard of each step (`trainer.distributed`: the split, the loss scaling, the
decisions the ranks share); rank 0 alone publishes, the others `follow_version`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from core.contracts import PreferencePair
from core.settings import TrainerSettings
from trainer.checkpoint import (
    Checkpoint,
    TrainerState,
    latest_checkpoint,
    load_optimizer_state,
    new_state,
    recipe_settings,
    save_checkpoint,
)
from trainer.distributed import SOLO, Ranks
from trainer.kl_control import drift_per_token, next_beta
from trainer.logps import Scored
from trainer.losses import LossOutput, LossParams, PairLogps, dpo_loss, reward_metrics
from trainer.model import Policy, autocast, load_policy
from trainer.schedule import lr_at
from trainer.tokenize import TokenizedPair, tokenize_pair
from trainer.window import (
    WindowResult,
    compare_with_sampler,
    detached,
    merge_outputs,
    record_step,
)

log = logging.getLogger(__name__)


class NonFiniteWeights(RuntimeError):
    """The adapter holds NaN/inf: it must never be published."""


class Trainer:
    """The policy, its optimizer and the trainer state of the newest version; one rolling update at a time."""

    def __init__(self, policy: Policy, settings: TrainerSettings, state: TrainerState | None = None,
                 ranks: Ranks = SOLO):
        self.policy, self.settings, self.ranks = policy, settings, ranks
        self.state = state or TrainerState(base_model=policy.base_model)
        # the forward that trains (DDP/FSDP under torchrun) and the plain one (reference log-probs)
        self._train_forward, self._plain_forward = ranks.wrap(policy)
        # an adapted beta continues after a restart; with a fixed beta (kl_target 0) the setting rules
        beta = self.state.beta if settings.kl_target > 0 and self.state.beta > 0 else settings.beta
        self.loss_params = LossParams(beta, settings.label_smoothing, settings.discopop_tau)
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        self.optimizer_steps = self.state.optimizer_steps
        self._trained = set(self.state.trained_ids)

    @classmethod
    def open(cls, model_dir: Path, settings: TrainerSettings, store: Path | None = None,
             device: torch.device | None = None, ranks: Ranks = SOLO) -> Trainer:
        """A trainer resumed from the newest version in `store`, or a fresh LoRA (version 0)."""
        found = latest_checkpoint(store) if store is not None else None
        device = device or ranks.load_device
        ranks.same_everywhere("the version to resume at", found[1].version if found else 0)
        if found is None:
            return cls(load_policy(model_dir, settings, device=device), settings, ranks=ranks)
        ckpt, state = found
        trainer = cls(load_policy(model_dir, settings, adapter_dir=ckpt.path, device=device), settings, state,
                      ranks)
        if load_optimizer_state(store, ckpt.version, trainer.optimizer) is None:
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

    # -- forward pieces -------------------------------------------------------------------------
    @property
    def forward_tokens(self) -> int:
        """Tokens per packed forward: one pair each on a CPU (no padding at all), batches on a GPU."""
        if self.settings.forward_tokens:
            return self.settings.forward_tokens
        return 16384 if self.policy.device.type == "cuda" else 0

    def _autocast(self):
        return autocast(self.policy.device, self.settings.precision)

    def reference(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        """pair id -> [2] reference log-probs (chosen, rejected)."""
        # through the module's call, not reference_logps: FSDP gathers its shards only in calls of what it wraps
        with self._autocast(), torch.no_grad():
            ref = self._plain_forward(pairs, self.forward_tokens, reference=True).float()
        return {p.pair_id: ref[i] for i, p in enumerate(pairs)}

    def forward(self, batch: Sequence[TokenizedPair], ref: dict[str, torch.Tensor]) -> tuple[LossOutput, Scored]:
        """Policy log-probs of one micro-batch and its losses against the reference."""
        with self._autocast():
            scored = Scored(*self._train_forward(batch, self.forward_tokens))
        pol = scored.logps.float()
        rf = torch.stack([ref[p.pair_id] for p in batch])
        lengths = scored.lengths.to(pol.device).float()
        logps = PairLogps(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], lengths[:, 0], lengths[:, 1])
        return dpo_loss(logps, self.loss_params, self.settings.loss_type), scored

    # -- one rolling update ---------------------------------------------------------------------
    def step_batches(self, pairs: Sequence[TokenizedPair]) -> list[list[TokenizedPair]]:
        """The pairs of each of the window's optimizer steps: `step_pairs` at a time, pass after pass."""
        size = self.settings.step_pairs or len(pairs)
        steps: list[list[TokenizedPair]] = []
        epoch = 0
        while len(steps) < self.settings.steps_per_window:
            order = list(pairs)
            if self.settings.shuffle:
                random.Random(f"{self.settings.seed}/{self.version}/{epoch}").shuffle(order)
            steps += [order[i : i + size] for i in range(0, len(order), size)]
            epoch += 1
        return steps[: self.settings.steps_per_window]

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
        opt_snapshot, steps_before = copy.deepcopy(self.optimizer.state_dict()), self.optimizer_steps
        steps = self.step_batches(pairs)
        ref = self.reference(self._scored_here(pairs, steps))
        result.drift = self._drift(pairs, ref)
        compared: set[str] = set()
        self.policy.model.train()
        for step in steps:
            if self.ranks.leaders_word(should_stop is not None and should_stop()):
                result.aborted = True
                break
            ts = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss, outs = self._accumulate(step, ref)
            if result.steps == 0:  # no update yet: the weights are those of the version that sampled
                compare_with_sampler(outs, self.version, result, compared)
            # spread over ranks, every rank clips the same summed gradient (its own outs may be empty)
            norm = torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm) \
                if outs or self.ranks.spread else None
            if not self.ranks.all_agree(norm is not None and math.isfinite(loss) and bool(torch.isfinite(norm))):
                self.optimizer.zero_grad(set_to_none=True)
                result.skipped += 1
                log.warning("non-finite loss or gradient at version %d: step skipped", self.version)
                continue
            lr = self._lr()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer_steps += 1
            record_step(result, loss, self._everyones(outs), norm.item(), lr)
            result.step_seconds.append(time.perf_counter() - ts)
        if self.ranks.spread:
            result.logprob_mismatch = [m for part in self.ranks.gather(result.logprob_mismatch) for m in part]
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.model.eval()
        if result.aborted or not self.ranks.all_agree(self.weights_finite()):
            with torch.no_grad():
                for p, saved in zip(params, snapshot):
                    p.copy_(saved)
            self.optimizer.load_state_dict(opt_snapshot)
            self.optimizer_steps = steps_before
            if not result.aborted:
                result.restored = True
                log.error("weights went non-finite at version %d: restored the window's start", self.version)
        result.seconds = time.perf_counter() - t0
        result.beta = self.loss_params.beta
        return result

    def _drift(self, pairs, ref) -> float:
        """The sampling versions' measured drift (every rank's pairs under torchrun); NaN when none tells."""
        mine = drift_per_token(pairs, ref)
        values = [d for part in self.ranks.gather([mine]) for d in part] if self.ranks.spread else [mine]
        values = [d for d in values if d is not None]
        return sum(values) / len(values) if values else math.nan

    def next_beta(self, result: WindowResult) -> float:
        """The beta the next window trains with (kl_control): adapted to this window's drift when asked."""
        s = self.settings
        drift = result.drift if math.isfinite(result.drift) else None
        return next_beta(self.loss_params.beta, drift, s.kl_target, s.beta_min, s.beta_max)

    def _scored_here(self, pairs: Sequence[TokenizedPair], steps: list[list[TokenizedPair]]) -> list[TokenizedPair]:
        """The pairs whose reference this rank needs: the window's in a single process, else those of its shards."""
        if not self.ranks.spread:
            return list(pairs)
        return list({p.pair_id: p for s in steps for p in (self.ranks.shard(s) or s[:1])}.values())

    def _everyones(self, outs):
        """The step's outputs of every rank, in step order (this rank's own in a single process)."""
        if not self.ranks.spread:
            return outs
        return [o for part in self.ranks.gather(detached(outs)) for o in part]

    def _accumulate(self, step: list[TokenizedPair], ref) -> tuple[float, list[tuple[LossOutput, Scored, list]]]:
        """Backward over the step's micro-batches; returns the step loss (inf/NaN stops early) and outputs."""
        n_pairs, n_chosen = len(step), sum(len(p.chosen_ids) for p in step)
        if self.ranks.spread:
            return self._accumulate_shard(step, ref, n_pairs, n_chosen)
        size, total, outs = self.settings.batch_pairs, 0.0, []
        for i in range(0, len(step), size):
            batch = step[i : i + size]
            out, scored = self.forward(batch, ref)
            loss = out.objective(n_pairs, n_chosen, self.settings.rpo_alpha)
            if not torch.isfinite(loss):
                return math.nan, []
            loss.backward()
            total += loss.item()
            outs.append((out, scored, batch))
        return total, outs

    def _accumulate_shard(self, step: list[TokenizedPair], ref, n_pairs: int, n_chosen: int):
        """This rank's shard of the step; the gradient, once reduced, and the loss returned are the whole step's.

        No early stop on a non-finite loss here: every rank must join the same all-reduces; a NaN
        reaches the summed loss and gradient on every rank, and the step is skipped everywhere.
        """
        mine, size, ranks = self.ranks.shard(step), self.settings.batch_pairs, self.ranks
        batches = [mine[i : i + size] for i in range(0, len(mine), size)] or [[]]
        total, outs = 0.0, []
        for k, batch in enumerate(batches):
            with ranks.accumulating(more=k < len(batches) - 1):
                out, scored = self.forward(batch or step[:1], ref)
                loss = out.objective(n_pairs, n_chosen, self.settings.rpo_alpha)
                if not batch:  # nothing of this step here: join the gradient all-reduce with a zero
                    loss = loss * 0.0
                ranks.backward(loss)
            if batch:
                total += loss.item()
                outs.append((out, scored, batch))
        ranks.reduce_gradients(self.policy.trainable_parameters())
        return ranks.total(total), outs

    def _lr(self) -> float:
        s = self.settings
        return lr_at(self.optimizer_steps, s.learning_rate, s.lr_scheduler, s.warmup_steps, s.decay_steps,
                     s.min_lr_ratio)

    # -- evaluation and publishing --------------------------------------------------------------
    @torch.no_grad()
    def score(self, pairs: Sequence[TokenizedPair]) -> tuple[list[LossOutput], list[Scored], dict]:
        """Losses and log-probs of the current policy on `pairs` in micro-batches, without training."""
        ref = self.reference(pairs)
        self.policy.model.eval()
        size = self.settings.batch_pairs
        outs = [self.forward(pairs[i : i + size], ref) for i in range(0, len(pairs), size)]
        return [o for o, _ in outs], [s for _, s in outs], ref

    def evaluate(self, pairs: Sequence[TokenizedPair]) -> dict[str, float]:
        """Mean loss and rewards of the current policy on `pairs`, without training."""
        losses, _, _ = self.score(pairs)
        merged = merge_outputs(losses)
        return {"loss": merged.losses.mean().item(), **reward_metrics(merged)}

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.policy.trainable_parameters())

    def publish_version(self, store: Path, pair_ids: Sequence[str], result: WindowResult,
                        offsets: dict[str, int] | None = None) -> Checkpoint:
        """Write version N+1 (adapter, state with `pair_ids` in the ledger, optimizer) into the store."""
        if not self.weights_finite():
            raise NonFiniteWeights(f"refusing to publish version {self.version + 1}: non-finite LoRA weights")
        beta = self.next_beta(result)
        state = new_state(self.state, list(pair_ids), offsets or {}, result.metrics(), self.optimizer_steps, beta,
                          recipe_settings(self.settings))
        ckpt = save_checkpoint(store, self.policy.model, self.optimizer, state)
        self.state, self.loss_params = state, dataclasses.replace(self.loss_params, beta=beta)
        self._trained.update(pair_ids)
        return ckpt

    def follow_version(self, pair_ids: Sequence[str], result: WindowResult) -> None:
        """A rank > 0: take the state of the version rank 0 publishes for this window; write nothing."""
        beta = self.next_beta(result)
        self.state = new_state(self.state, list(pair_ids), {}, result.metrics(), self.optimizer_steps, beta)
        self.loss_params = dataclasses.replace(self.loss_params, beta=beta)
        self._trained.update(pair_ids)


def train_window(trainer: Trainer, pairs: Sequence[TokenizedPair],
                 should_stop: Callable[[], bool] | None = None) -> WindowResult:
    """Module-level form of `Trainer.train_window`, for callers that hold a trainer."""
    return trainer.train_window(pairs, should_stop)

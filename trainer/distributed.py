"""Data-parallel training with torch.distributed: `torchrun --nproc-per-node N -m service.cli trainer|train`.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK (and MASTER_ADDR/PORT); `Ranks.from_env`
joins the process group (gloo on CPU, nccl on CUDA, each rank on `cuda:LOCAL_RANK`)
with `timeout=dist_timeout_s`. Without WORLD_SIZE > 1 it returns `SOLO` and nothing
here touches torch.distributed: one process, exactly the single-process code path.

Who reads the pairs: rank 0 alone consumes Kafka and broadcasts each window to the
others (`lead_window` / `follow`). The window, the duplicate/stale drops, the ledger,
the pair archive, offset commits and AdapterReady then live in one process, exactly
as with one trainer, so exactly-once needs no agreement between ranks: a version is
published, and its offsets committed, only by rank 0 and only after every rank
finished the window's collectives. Ranks reading partitions of their own would each
need the others' ids to drop duplicates, a joint commit of offsets that belong to one
consumer group, and a way to agree on when a window is full. `odpo train` (a file)
needs no broadcast: every rank reads the same file the same way.

The split: each optimizer step's pairs (the window's, or `step_pairs` of them) are
cut into `size` contiguous shards, one per rank. A rank's loss share is computed
with the WHOLE step's counts (`LossOutput.objective(n_pairs, n_chosen_tokens)`), so
the shares of all ranks add up to the single-process step loss and their gradients
to its gradient. DDP averages gradients over ranks, so each rank backpropagates
`size x` its share: the average is then the sum, the single-process gradient (a
power-of-two size scales exactly). Micro-batches of `batch_pairs` accumulate under
`no_sync` and the last one all-reduces. A rank whose shard of a step is empty (fewer
pairs than ranks) still joins that all-reduce with a zero loss on a pair of the step.
Every rank then clips the same gradient and takes the same AdamW step; the loss,
rewards and logps of the step are gathered so rank 0 records what one process would.
Decisions that must agree (skip a non-finite step, restore non-finite weights, stop
on rank 0's request) are all-reduced or broadcast from rank 0.

Failure: every collective times out after `dist_timeout_s`, so a rank waiting for a
killed peer raises instead of hanging, and the process exits non-zero; torchrun (or
the supervisor) restarts the group, and it resumes from the store like one trainer
(a kill before the version's rename trains the replayed window again; its pairs are
not in the ledger). While idle, rank 0 sends a keepalive (a broadcast and an
all-reduce) every `dist_timeout_s / 4` at most, so waiting followers do not time out
and a dead follower is noticed between windows too.

FSDP (`parallel: fsdp`): FSDP2's `fully_shard` over each decoder layer and the root
scorer module, `ignored_params` = the LoRA weights. So the frozen base model is
sharded (what does not fit one device), while the LoRA weights, their gradients
(all-reduced here, summed) and AdamW's state stay whole on every rank: checkpoints,
the optimizer file and a resume are the same as with DDP, and rank 0 writes them
alone. Every forward goes through the scorer module, the reference's too: FSDP's
hooks gather the shards there. Works with peft on CPU/gloo in torch 2.13 (the tiny
model in tests/test_trainer_ddp.py: the same adapters as one process). Not done: each
rank still reads the whole base model into host memory before sharding it onto its
device (N copies in RAM while loading; a meta-device load would avoid that), and the
CUDA/NCCL path has not run here (no GPU).

torchrun restarts: its agent keeps one TCPStore for all restarts of a group, so the
group is initialised on a store prefixed by TORCHELASTIC_RESTART_COUNT (see from_env).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.logps import reference_logps, score_pairs

log = logging.getLogger(__name__)

TRAIN, IDLE, STOP = "train", "idle", "stop"


class PairScorer(torch.nn.Module):
    """`score_pairs` (and the reference's log-probs) as one module call, so DDP's and FSDP's hooks see it.

    `score_pairs` calls the decoder and the LM head directly, past the peft model's forward; a DDP or
    FSDP wrapper only acts on calls of the module it wraps, so it wraps this one.
    """

    def __init__(self, model, device: torch.device, pad_id: int):
        super().__init__()
        self.model, self.device, self.pad_id = model, device, pad_id

    def forward(self, pairs, forward_tokens: int = 0, reference: bool = False):
        if reference:
            return reference_logps(self.model, pairs, self.device, self.pad_id, forward_tokens)
        s = score_pairs(self.model, pairs, self.device, self.pad_id, forward_tokens)
        return s.logps, s.token_logps, s.mean_logit_sums, s.lengths  # a tuple: FSDP finds its tensors


@dataclass
class Ranks:
    """This process's place in the group; the single-process defaults make every method a no-op."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None
    parallel: str = "ddp"
    timeout_s: float = 60.0
    _last_sent: float = field(default=0.0, repr=False)
    _ddp: torch.nn.Module | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, settings) -> Ranks:
        """Join torchrun's process group when WORLD_SIZE > 1; else `SOLO` (torch.distributed untouched)."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return SOLO
        rank, local = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        timeout = timedelta(seconds=settings.dist_timeout_s)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun's agent keeps one TCPStore across the restarts of a group: without a prefix per restart,
        # a restarted gloo group reads its dead predecessors' addresses and fails to connect
        # (pytorch/pytorch#135712; seen here with torch 2.13). One agent (one pod) counts restarts alike.
        prefix = f"odpo-trainer/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=size,
                                timeout=timeout)
        log.info("rank %d of %d (%s, %s, %s)", rank, size, backend, device, settings.parallel)
        return cls(rank, size, device, settings.parallel, settings.dist_timeout_s, time.monotonic())

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def spread(self) -> bool:
        """More than one rank: the window is split."""
        return self.size > 1

    # -- the split ------------------------------------------------------------------------------
    def shard(self, items: Sequence) -> list:
        """This rank's contiguous share of `items` (shares differ by at most one item)."""
        n = len(items)
        return list(items[self.rank * n // self.size : (self.rank + 1) * n // self.size])

    # -- the model ------------------------------------------------------------------------------
    @property
    def load_device(self) -> torch.device | None:
        """Where the policy is loaded: FSDP shards it from host memory onto the rank's device."""
        return torch.device("cpu") if self.spread and self.parallel == "fsdp" else self.device

    def wrap(self, policy) -> tuple[torch.nn.Module, PairScorer]:
        """(training forward, plain forward) over `policy.model`: one plain `PairScorer` for both in a single
        process, DDP or FSDP around it under torchrun.

        FSDP moves the policy to this rank's device as it shards it (`policy.device` follows).
        """
        model = policy.model
        if not self.spread:
            scorer = PairScorer(model, policy.device, policy.pad_id)
            return scorer, scorer
        lora = [p for p in model.parameters() if p.requires_grad]
        if self.parallel == "fsdp":
            policy.device = self.device
            scorer = PairScorer(model, self.device, policy.pad_id)
            _fully_shard(scorer, model, lora, self.device)
            return scorer, scorer
        scorer = PairScorer(model, policy.device, policy.pad_id)
        trainable = {id(p) for p in lora}
        frozen = [n for n, p in scorer.named_parameters() if id(p) not in trainable]
        # the base model is read from the same files on every rank: only the LoRA weights are broadcast from
        # rank 0 (and checked for equal shapes); buffers (rotary tables) never change
        DDP._set_params_and_buffers_to_ignore_for_model(scorer, frozen + [n for n, _ in scorer.named_buffers()])
        self._ddp = DDP(scorer, device_ids=None, forward_sync_buffers=False)
        return self._ddp, scorer

    def accumulating(self, more: bool):
        """Around a micro-batch's forward and backward: DDP all-reduces only on the step's last one."""
        return self._ddp.no_sync() if (more and self._ddp is not None) else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """DDP averages gradients over ranks: `size x` the share makes that average the sum of the shares."""
        (loss * self.size if self._ddp is not None else loss).backward()

    def reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """FSDP leaves the (ignored) LoRA weights' gradients alone: sum them over ranks here."""
        if not self.spread or self._ddp is not None:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()

    # -- agreement ------------------------------------------------------------------------------
    def total(self, value: float) -> float:
        """Sum of `value` over ranks (the same on every rank)."""
        if not self.spread:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def all_agree(self, ok: bool) -> bool:
        """True on every rank only when it is true on every rank."""
        if not self.spread:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def leaders_word(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (e.g. stop now: only rank 0 hears the signal that counts)."""
        if not self.spread:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.spread:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def same_everywhere(self, what: str, value) -> None:
        """Raise unless every rank holds the same `value` (e.g. the version each resumed at)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"ranks disagree on {what}: {values}")

    # -- rank 0's commands ----------------------------------------------------------------------
    def send(self, command: str, payload=None) -> None:
        """Rank 0: broadcast a command to the other ranks (`follow` receives it)."""
        if not self.spread:
            return
        dist.broadcast_object_list([command, payload], src=0)
        self._last_sent = time.monotonic()
        if command == IDLE:  # wait for every follower: a dead one is noticed now, not at the next window
            self.all_agree(True)

    def receive(self) -> tuple[str, object]:
        box: list = [None, None]
        dist.broadcast_object_list(box, src=0)
        if box[0] == IDLE:
            self.all_agree(True)
        return box[0], box[1]

    def keepalive(self) -> None:
        """Rank 0, while idle: a keepalive once a quarter of the timeout has passed since the last command."""
        if self.spread and time.monotonic() - self._last_sent >= min(10.0, self.timeout_s / 4):
            self.send(IDLE)

    def close(self, clean: bool) -> None:
        """Leave the group; after an error only the process's exit does (a dead peer may block a teardown)."""
        if self.spread and clean:
                dist.destroy_process_group()


SOLO = Ranks()


def _fully_shard(scorer: PairScorer, model, ignored: list[torch.nn.Parameter], device: torch.device) -> None:
    """FSDP2 over each decoder layer, then the scorer as root (embeddings, norm, head); LoRA weights ignored."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    base = model.get_base_model()
    layer_types = tuple(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise RuntimeError(f"parallel=fsdp: no decoder layers found in {type(base).__name__}")
    ignored_set = set(ignored)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored_set)
    fully_shard(scorer, mesh=mesh, ignored_params=ignored_set)
    with torch.no_grad():  # FSDP moves what it manages; the LoRA weights it ignores follow by hand
        for p in ignored:
            p.data = p.data.to(device)


def lead_window(ranks: Ranks, trainer, pairs: Sequence, should_stop=None):
    """Rank 0: send the window to every rank, then train it with them (`Trainer.train_window`)."""
    ranks.send(TRAIN, list(pairs))
    return trainer.train_window(pairs, should_stop)


def follow(ranks: Ranks, trainer) -> None:
    """A rank > 0 of `odpo trainer`: train every window rank 0 sends, until it says stop.

    A window that ends publishable on rank 0 ends publishable here too (the decisions are shared), so
    this rank takes the version's state as rank 0 writes it (`Trainer.follow_version`), writing nothing.
    """
    log.info("rank %d follows rank 0's windows", ranks.rank)
    while True:
        command, payload = ranks.receive()
        if command == STOP:
            return
        if command == TRAIN:
            result = trainer.train_window(payload)
            if result.publishable:
                trainer.follow_version([p.pair_id for p in payload], result)

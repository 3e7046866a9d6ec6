"""Versions in the adapter store: `policy-v<N>/` = LoRA adapter + trainer state; optimizer state beside them.

Layout of one version folder (written to a temp folder, renamed into place):
- `adapter_model.safetensors`, `adapter_config.json`: peft's `save_pretrained`,
  what vLLM loads (`--enable-lora --max-lora-rank >= r`);
- `trainer_state.json`: `TrainerState` (version, parent, trained pair ids,
  offsets committed with this version, metrics, the training settings).
The sha256 in `AdapterReady` is computed on the final folder, after the rename,
so nothing in a version folder changes once it is in place (the generator and
the gateway verify it). Whether its `AdapterReady` went out is kept beside the
folders instead, in `trainer-published` (the newest version announced).

AdamW's state (twice the adapter's size) lives outside the version folders, in
`trainer-optimizer/policy-v<N>.pt`: only a resume needs it, and only the
newest version's. It is written atomically before the version's folder is
renamed into place; once the rename is done the older ones are deleted (a
version folder cannot lose a file: that would change its digest). A store
from before this layout has `optimizer.pt` inside the folders: a resume
reads it there when `trainer-optimizer/` has none.

Before the rename, the version's line is appended to the trained ledger
(trainer/ledger.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.adapter_store import (
    ANNOUNCED_DIR,
    PUBLISHED_FILE,
    adapter_digest,
    publish_dir,
    published_versions,
    staging_dir,
    version_path,
    write_file_atomic,
)
from core.contracts import version_name
from trainer.ledger import append_trained

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"  # inside a version folder: stores from before `trainer-optimizer/`
OPTIMIZER_DIR = "trainer-optimizer"


@dataclass
class TrainerState:
    """What the trainer must remember across restarts; one copy per published version."""

    version: int = 0
    parent_version: int = 0
    base_model: str = ""
    trained_ids: list[str] = field(default_factory=list)  # every pair id trained so far: replays train nothing twice
    window_ids: list[str] = field(default_factory=list)  # the pairs the update that made this version trained
    optimizer_steps: int = 0  # global step count: the learning-rate schedule continues from it
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset, committed after publish
    metrics: dict[str, float] = field(default_factory=dict)  # of the update that made this version
    beta: float = 0.0  # DPO beta for the next window when the trainer adapts it (0: the settings' beta)
    created_at: float = 0.0
    settings: dict = field(default_factory=dict)  # recipe_settings of the update that made this version

    @property
    def pairs_trained(self) -> int:
        return len(self.trained_ids)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Checkpoint:
    version: int
    path: Path
    sha256: str


def save_checkpoint(store: Path, model, optimizer: torch.optim.Optimizer | None, state: TrainerState) -> Checkpoint:
    """Write `state.version` into the store atomically; returns its final folder and digest."""
    staged = staging_dir(store, state.version)
    try:
        model.save_pretrained(staged, safe_serialization=True)
        readme = staged / "README.md"  # peft's model card: noise that would only change the digest
        if readme.exists():
            readme.unlink()
        (staged / STATE_FILE).write_text(state.to_json())
        _readable(staged)
        if optimizer is not None:
            save_optimizer_state(store, state.version, optimizer)
        append_trained(store, state.version, state.window_ids)
        final = publish_dir(staged, store, state.version)
    except BaseException:
        _remove(staged)
        raise
    if optimizer is not None:
        remove_optimizer_states(store, keep=state.version)
    return Checkpoint(state.version, final, adapter_digest(final))


def latest_checkpoint(store: Path) -> tuple[Checkpoint, TrainerState] | None:
    """The newest complete version in the store with its state, or None for a fresh store."""
    for version in reversed(published_versions(store)):
        folder = version_path(store, version)
        try:
            state = TrainerState.from_json((folder / STATE_FILE).read_text())
        except (OSError, ValueError, TypeError) as exc:  # not written by this trainer, or damaged: look further back
            log.warning("skipping %s: no usable %s (%s)", folder, STATE_FILE, exc)
            continue
        if state.version != version:
            log.warning("skipping %s: its state says version %d", folder, state.version)
            continue
        return Checkpoint(version, folder, adapter_digest(folder)), state
    return None


def optimizer_path(store: Path, version: int) -> Path:
    return Path(store) / OPTIMIZER_DIR / f"{version_name(version)}.pt"


def save_optimizer_state(store: Path, version: int, optimizer: torch.optim.Optimizer) -> Path:
    """Write `version`'s AdamW state to `trainer-optimizer/` all at once (temp file, fsync, rename)."""
    import io

    path = optimizer_path(store, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    write_file_atomic(path, buf.getvalue())
    return path


def load_optimizer_state(store: Path, version: int, optimizer: torch.optim.Optimizer) -> Path | None:
    """Restore `version`'s AdamW state from `trainer-optimizer/` or, in an old store, its folder; None: none found."""
    for path in (optimizer_path(store, version), version_path(store, version) / OPTIMIZER_FILE):
        if path.is_file():
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return path
    return None


def remove_optimizer_states(store: Path, keep: int) -> list[Path]:
    """Delete the optimizer state of every version but `keep` (a resume only needs the newest)."""
    folder = Path(store) / OPTIMIZER_DIR
    keep_name = optimizer_path(store, keep).name
    gone = [p for p in folder.glob("policy-v*.pt") if p.name != keep_name] if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# The TrainerSettings that shape an update (what a model card and an experiment tracker show), not the plumbing.
RECIPE_FIELDS = ("loss_type", "beta", "kl_target", "beta_min", "beta_max", "label_smoothing", "rpo_alpha",
                 "discopop_tau", "learning_rate", "lr_scheduler", "warmup_steps", "decay_steps", "min_lr_ratio",
                 "weight_decay", "window_pairs", "window_seconds", "steps_per_window", "step_pairs", "batch_pairs",
                 "shuffle", "precision", "max_grad_norm", "max_length", "max_staleness", "lora_r", "lora_alpha",
                 "lora_dropout", "target_modules", "seed")


def recipe_settings(settings) -> dict:
    """The training settings of `settings` (a TrainerSettings) as plain JSON values."""
    return settings.model_dump(mode="json", include=set(RECIPE_FIELDS))


def new_state(prev: TrainerState, pair_ids: list[str], offsets: dict[str, int], metrics: dict[str, float],
              optimizer_steps: int | None = None, beta: float | None = None,
              settings: dict | None = None) -> TrainerState:
    """The state of the version that follows `prev` after training `pair_ids` (with `settings`, else prev's)."""
    merged = dict(prev.offsets)
    merged.update(offsets)
    seen = set(prev.trained_ids)
    fresh = [i for i in dict.fromkeys(pair_ids) if i not in seen]
    return TrainerState(version=prev.version + 1, parent_version=prev.version, base_model=prev.base_model,
                        trained_ids=prev.trained_ids + fresh, window_ids=list(pair_ids),
                        optimizer_steps=prev.optimizer_steps if optimizer_steps is None else optimizer_steps,
                        offsets=merged, metrics=metrics, created_at=time.time(),
                        beta=prev.beta if beta is None else beta,
                        settings=dict(prev.settings if settings is None else settings))


def remove_staging_leftovers(store: Path) -> int:
    """Delete half-written version folders of a killed trainer (this trainer is the store's only writer)."""
    store = Path(store)
    if not store.is_dir():
        return 0
    leftovers = [p for p in store.iterdir() if p.name.startswith(".policy-v") and ".tmp-" in p.name]
    leftovers += [p for p in store.iterdir() if p.name.startswith(f".{PUBLISHED_FILE}.tmp-")]
    for sub in (OPTIMIZER_DIR, ANNOUNCED_DIR):  # atomic writes (write_file_atomic) cut short
        if (store / sub).is_dir():
            leftovers += [p for p in (store / sub).iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in leftovers:
        _remove(p) if p.is_dir() else p.unlink(missing_ok=True)
    return len(leftovers)


def _readable(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors its file 0600: let a generator running as
    another user on a shared volume read the version (it never writes it)."""
    os.chmod(folder, 0o755)
    for p in folder.iterdir():
        os.chmod(p, 0o644)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

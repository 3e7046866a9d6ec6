"""Versions in the adapter store: `policy-v<N>/` = LoRA adapter + trainer state + optimizer state.

Layout of one version folder (written to a temp folder, renamed into place):
- `adapter_model.safetensors`, `adapter_config.json`: peft's `save_pretrained`,
  what vLLM loads (`--enable-lora --max-lora-rank >= r`);
- `trainer_state.json`: `TrainerState` (version, parent, trained pair ids,
  offsets committed with this version, metrics);
- `optimizer.pt`: AdamW state, so a resumed trainer continues its moments.
The sha256 in `AdapterReady` is computed on the final folder, after the rename,
so nothing in a version folder changes once it is in place. Whether its
`AdapterReady` went out is kept beside the folders instead, in
`trainer-published` (the newest version announced): a trainer killed between
the rename and the publish finds a newer folder than that and announces it on
restart (the generator ignores versions it already serves, so announcing
twice is harmless).
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

from service.adapter_store import PUBLISHED_FILE, adapter_digest, publish_dir, published_versions, staging_dir, version_path

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


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
    created_at: float = 0.0

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
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staged / OPTIMIZER_FILE)
        _readable(staged)
        final = publish_dir(staged, store, state.version)
    except BaseException:
        _remove(staged)
        raise
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


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> bool:
    path = Path(folder) / OPTIMIZER_FILE
    if not path.is_file():
        return False
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


def new_state(prev: TrainerState, pair_ids: list[str], offsets: dict[str, int], metrics: dict[str, float],
              optimizer_steps: int | None = None) -> TrainerState:
    """The state of the version that follows `prev` after training `pair_ids`."""
    merged = dict(prev.offsets)
    merged.update(offsets)
    seen = set(prev.trained_ids)
    fresh = [i for i in dict.fromkeys(pair_ids) if i not in seen]
    return TrainerState(version=prev.version + 1, parent_version=prev.version, base_model=prev.base_model,
                        trained_ids=prev.trained_ids + fresh, window_ids=list(pair_ids),
                        optimizer_steps=prev.optimizer_steps if optimizer_steps is None else optimizer_steps,
                        offsets=merged, metrics=metrics, created_at=time.time())


def remove_staging_leftovers(store: Path) -> int:
    """Delete half-written version folders of a killed trainer (this trainer is the store's only writer)."""
    store = Path(store)
    if not store.is_dir():
        return 0
    leftovers = [p for p in store.iterdir() if p.name.startswith(".policy-v") and ".tmp-" in p.name]
    leftovers += [p for p in store.iterdir() if p.name.startswith(f".{PUBLISHED_FILE}.tmp-")]
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

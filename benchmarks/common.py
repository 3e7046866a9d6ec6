"""What the benchmarks share: the base model, prompts, adapters to swap in, and small statistics.

Run the benchmarks from the repository root as modules (`python -m benchmarks.hotswap`),
under the vLLM lock on a shared machine (`flock /tmp/odpo-vllm.lock ...`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
from collections import Counter
from pathlib import Path

from core.adapter_store import adapter_digest, publish_dir, staging_dir, write_manifest
from core.assets import base_model_dir, base_model_name
from core.contracts import AdapterReady, TrainMetrics
from service.task import make_prompts

CACHE_DIR = Path(os.environ.get("ODPO_CACHE_DIR", "~/.cache/odpo")).expanduser()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# The promotion gate (`odpo gate`, settings ODPO_GATE_*) opened wide, for the benchmarks that measure serving or
# survival, not learning: any version is promoted (tolerance 1, every degeneration limit off) and the gate loads
# no reference model (no base log-prob per token). The held-out prompt count is each benchmark's own.
OPEN_GATE_ENV = {"ODPO_GATE_PROMOTION_TOLERANCE": "1", "ODPO_GATE_REFERENCE_LOGPROB": "false",
                 "ODPO_GATE_LIMIT_REF_LOGPROB": "100",
                 **{f"ODPO_GATE_LIMIT_{s}": "1" for s in ("MEAN_WORDS", "EMPTY_SHARE", "DISTINCT2", "ON_TOPIC_SHARE",
                                                         "GUARD_PASS")}}


def quiet_logs() -> None:
    """Progress lines of our own only; vLLM's server logs go to its log file anyway."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")


def model_dir() -> Path:
    return base_model_dir(CACHE_DIR, Path(os.environ["ODPO_BASE_MODEL"]) if "ODPO_BASE_MODEL" in os.environ else None)


def chat_prompt_ids(tokenizer, n: int) -> list[list[int]]:
    """The first `n` bundled train prompts through the chat template, as the sampler sends them."""
    out = []
    for p in make_prompts("train", n):
        ids = tokenizer.apply_chat_template([m.model_dump() for m in p.messages], add_generation_prompt=True,
                                            tokenize=True)
        out.append([int(i) for i in (ids["input_ids"] if not isinstance(ids, list) else ids)])
    return out


def peft_model(base_dir: Path, r: int = 8):
    """The base model in fp32 with a fresh LoRA of rank `r` on the attention projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                                           task_type="CAUSAL_LM")).eval()


def write_adapters(model, base_dir: Path, store: Path, versions: list[int]) -> list[AdapterReady]:
    """Publish and announce one adapter per version in the store, as the trainer does (random non-zero lora_B,
    so every version answers differently); returns their AdapterReady messages."""
    import torch

    readies = []
    for v in versions:
        gen = torch.Generator().manual_seed(v)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        staged = staging_dir(store, v)
        model.save_pretrained(staged)
        final = publish_dir(staged, store, v)
        ready = AdapterReady(version=v, path=final.name, sha256=adapter_digest(final),
                             base_model=base_model_name(base_dir), parent_version=v - 1, pairs_trained=0,
                             metrics=TrainMetrics(loss=0.69, reward_margin=0.0, reward_accuracy=0.5, steps=1))
        write_manifest(store, ready)  # announced, as the trainer does: readers take only announced versions
        readies.append(ready)
    return readies


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95), "mean": statistics.fmean(xs),
            "min": min(xs), "max": max(xs)}


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


class ClientLoops:
    """Gateway clients of a benchmark, one thread per kind, each running `_loop(kind)` until `stop`; `results`
    counts outcomes by a tuple key, `newest` is the newest published version for the loops to ask for."""

    kinds: tuple[str, ...] = ()

    def __init__(self, gateway: str):
        self.gateway, self.newest = gateway, 0
        self.results: Counter = Counter()
        self._halt = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in self.kinds]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> dict[str, int]:
        """Stop the loops; the outcomes as "kind/.../outcome" -> count."""
        self._halt.set()
        for t in self._threads:
            t.join(timeout=150)
        return {"/".join(map(str, k)): n for k, n in sorted(self.results.items())}

    def _loop(self, kind: str) -> None:
        raise NotImplementedError

"""Helpers for gateway and gate tests: the real apps in uvicorn on free ports, `base` registered, adapters in the store."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from core.adapter_store import adapter_digest, publish_dir, staging_dir
from core.assets import base_model_name
from core.broker import free_port
from core.contracts import AdapterReady, TrainMetrics
from core.settings import CommonSettings, GateSettings, GatewaySettings
from service.gate import create_gate_app
from service.gateway import create_app


def scoped_topic() -> str:
    """A control topic of this test's own, so no test inherits another's decisions on the session broker."""
    return f"odpo.control.{uuid.uuid4().hex[:8]}"


@contextmanager
def running_gateway(settings: GatewaySettings, common: CommonSettings) -> Iterator[str]:
    """The gateway app served by uvicorn on 127.0.0.1:<free port> in a thread; yields its base URL.

    Unless `settings` name another control topic than the default, it reads a fresh one (no gate writes it:
    `base` is `policy`); `running_loop` starts a gateway with a gate on a topic of their own.
    """
    if settings.control_topic == GatewaySettings.model_fields["control_topic"].default:
        settings = settings.model_copy(update={"control_topic": scoped_topic()})
    port = free_port()
    with _serving(create_app(settings.model_copy(update={"port": port}), common), port) as url:
        yield url


@contextmanager
def running_gate(settings: GateSettings, common: CommonSettings, promote: bool = True,
                 ready: bool = True) -> Iterator[str]:
    """The gate app in uvicorn on a free port; yields its base URL once its /readyz is 200 (it writes the
    registry), unless `ready` is False. Its registry goes to a fresh temporary file unless `settings` name one."""
    port = free_port()
    update = {"port": port}
    if settings.persist_registry and settings.registry_file is None:
        update["registry_file"] = Path(tempfile.mkdtemp(prefix="odpo-registry-")) / "gate-registry.json"
    if settings.control_topic == GateSettings.model_fields["control_topic"].default:
        update["control_topic"] = scoped_topic()
    with _serving(create_gate_app(settings.model_copy(update=update), common, promote=promote), port) as url:
        deadline = time.monotonic() + 60
        while ready and httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the gate did not claim the control topic within 60 s"
            time.sleep(0.1)
        yield url


@contextmanager
def running_loop(gate: GateSettings, gateway: GatewaySettings, common: CommonSettings,
                 promote: bool = True) -> Iterator[tuple[str, str]]:
    """A gate and a gateway on a control topic of their own; yields (gateway URL, gate URL)."""
    topic = scoped_topic()
    with running_gate(gate.model_copy(update={"control_topic": topic}), common, promote) as gate_url, \
            running_gateway(gateway.model_copy(update={"control_topic": topic}), common) as url:
        yield url, gate_url


def wait_policy(url: str, version: int, timeout_s: float = 30) -> None:
    """Until the gateway at `url` routes `policy` to `version` (it read the gate's decision)."""
    deadline = time.monotonic() + timeout_s
    while (seen := httpx.get(f"{url}/readyz", timeout=10).json().get("policy_version")) != version:
        assert time.monotonic() < deadline, f"the gateway routes policy to {seen}, not {version}"
        time.sleep(0.05)


@contextmanager
def _serving(app, port: int) -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def register_base(vllm_url: str, model_dir: Path, store: Path) -> None:
    """Serve the zero adapter as `base` on the shared vLLM, as the generator does (adopted if already there)."""
    from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter

    folder = write_zero_adapter(model_dir, store / ZERO_ADAPTER_DIR)
    resp = httpx.post(f"{vllm_url}/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": str(folder)})
    assert resp.status_code == 200 or "already been loaded" in resp.text, resp.text


def noisy_adapter(store: Path, model_dir: Path, version: int, scale: float, seed: int = 0,
                  parent: int = 0) -> AdapterReady:
    """`policy-v<version>` in the store: the zero adapter with lora_B ~ N(0, scale)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return _adapter(store, model_dir, version, parent,
                    lambda name, t: torch.randn(t.shape, generator=gen) * scale if "lora_B" in name else t)


def silent_adapter(store: Path, model_dir: Path, version: int, parent: int = 0, magnitude: float = 100.0):
    """A wrecked `policy-v<version>`: large LoRA weights that make every answer empty (EOS first).

    Large *random* weights are not a reliable wreck for the verifier judge:
    their gibberish ("preservedeeee...") is lowercase, comma-free and short,
    and scored above base on the held-out prompts (0.72 vs 0.51 measured).
    This one adds, at the last layer's o_proj, a vector along the direction
    whose logits single out EOS (least squares through the tied embedding,
    undoing the final norm's gain), scaled by the projection of the attention
    output on its mean direction, which is positive at every position
    measured (min 8, median 11 over 845 positions).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.task import make_prompts

    torch.set_num_threads(1)  # vLLM computes on the other core
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    last = len(model.model.layers) - 1
    seen: list = []
    hook = model.model.layers[last].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    with torch.no_grad():
        for p in make_prompts("train", 8):
            ids = tok.apply_chat_template([m.model_dump() for m in p.messages], add_generation_prompt=True,
                                          return_tensors="pt")
            model(ids if torch.is_tensor(ids) else ids["input_ids"])
    hook.remove()
    mean = torch.cat(seen).mean(0)
    emb = model.model.embed_tokens.weight.detach()
    eos = torch.zeros(emb.shape[0], 1)
    eos[tok.eos_token_id] = 1.0
    push = torch.linalg.lstsq(emb, eos).solution.squeeze(1) / model.model.norm.weight.detach()
    prefix = f"base_model.model.model.layers.{last}.self_attn.o_proj"

    def wreck(name: str, t):
        if name == f"{prefix}.lora_A.weight":
            t = torch.zeros_like(t)
            t[0] = mean / mean.norm()
        elif name == f"{prefix}.lora_B.weight":
            t = torch.zeros_like(t)
            t[:, 0] = magnitude * push / push.norm()
        elif "lora_B" in name:
            t = torch.zeros_like(t)
        return t

    return _adapter(store, model_dir, version, parent, wreck)


def _adapter(store: Path, model_dir: Path, version: int, parent: int, change) -> AdapterReady:
    """The zero adapter with each tensor replaced by `change(name, tensor)`, published as the trainer does."""
    from safetensors.torch import load_file, save_file

    from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter

    zero = write_zero_adapter(model_dir, store / ZERO_ADAPTER_DIR)
    staged = staging_dir(store, version)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(zero / f, staged / f)
    tensors = load_file(str(staged / "adapter_model.safetensors"))
    tensors = {name: change(name, t).contiguous() for name, t in tensors.items()}
    save_file(tensors, str(staged / "adapter_model.safetensors"), metadata={"format": "pt"})
    final = publish_dir(staged, store, version)
    return AdapterReady(version=version, path=final.name, sha256=adapter_digest(final),
                        base_model=base_model_name(model_dir), parent_version=parent, pairs_trained=4,
                        metrics=TrainMetrics(loss=0.6, reward_margin=0.2, reward_accuracy=0.75, steps=2))

"""Hot swap on a real vLLM server: new versions serve exactly the HF+peft adapter, bad ones are refused.

Versions used here (the vLLM server is shared by the session, names must not
collide): 1, 21-22, 31-34.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer

from generator.adapters import AdapterManager, AdapterRejected
from generator.sampler import Sampler
from core.adapter_store import adapter_digest, publish_dir, staging_dir
from core.assets import base_model_name
from core.contracts import AdapterReady, PromptEvent, TrainMetrics
from core.settings import GeneratorSettings

pytestmark = pytest.mark.vllm

PROMPTS = [PromptEvent(id="swap-1", messages=[{"role": "user", "content": "Write a haiku about the sea."}]),
           PromptEvent(id="swap-2", text="Once upon a time")]


def randomize_lora_b(peft_model, seed: int, scale: float = 0.05) -> None:
    """Non-zero lora_B weights, big enough to change greedy outputs of the 135M model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def publish_adapter(peft_model, store: Path, version: int, model_dir: Path) -> AdapterReady:
    """Save the peft model's adapter as `policy-v<version>` in the store, as the trainer does."""
    staged = staging_dir(store, version)
    peft_model.save_pretrained(staged)
    final = publish_dir(staged, store, version)
    return AdapterReady(version=version, path=final.name, sha256=adapter_digest(final),
                        base_model=base_model_name(model_dir), parent_version=version - 1, pairs_trained=0,
                        metrics=TrainMetrics(loss=0.69, reward_margin=0.0, reward_accuracy=0.5, steps=1))


def make_peft_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)  # vLLM computes on the other core
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(base, config).eval()


@pytest.fixture(scope="module")
def peft_model(model_dir):
    return make_peft_model(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(model, prompt_ids: list[int], n: int = 16) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return out[0, len(prompt_ids):].tolist()


def vllm_greedy(manager: AdapterManager, name: str | None, prompt_ids: list[int], n: int = 16) -> tuple[list[int], int]:
    """Greedy token ids from vLLM and the version that served them (the sampler refuses greedy n > 1)."""
    with manager.using(name) as (served_name, version):
        resp = manager.client.post("/v1/completions", json={
            "model": served_name, "prompt": prompt_ids, "max_tokens": n, "temperature": 0.0,
            "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"], version


def served(url) -> set[str]:
    return {m["id"] for m in httpx.get(f"{str(url).rstrip('/')}/v1/models").json()["data"]}


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("odpo_generator_swap_failures_total", {"reason": reason}) or 0.0


def test_new_version_serves_the_hf_peft_adapter_and_base_stays_plain(manager, peft_model, tokenizer, vllm_store,
                                                                     model_dir):
    randomize_lora_b(peft_model, seed=1)
    ready = publish_adapter(peft_model, vllm_store, 1, model_dir)
    assert manager.apply(ready) is True
    assert (manager.current_version, manager.current_name) == (1, "policy-v1")
    assert REGISTRY.get_sample_value("odpo_generator_policy_version") == 1
    assert manager.apply(ready) is False, "a version that is not newer is ignored"

    sampler = Sampler(manager.client, tokenizer, manager, GeneratorSettings())
    # base and policy-v1 requests at the same time, so vLLM batches them together (the CPU LoRA bug).
    jobs = [(sampler.prompt_token_ids(p), name) for p in PROMPTS for name in ("base", None)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: vllm_greedy(manager, j[1], j[0]), jobs))
    for (ids, name), (tokens, version) in zip(jobs, results):
        if name == "base":
            assert version == 0
            with peft_model.disable_adapter():
                expected = hf_greedy(peft_model, ids)
        else:
            assert version == 1, "the current version serves requests that name none"
            expected = hf_greedy(peft_model, ids)
        assert tokens == expected, f"{name} on {tokenizer.decode(ids)!r}"
    # Small random weights may leave one prompt's 16 greedy tokens as they were; never all of them.
    assert any(base != policy for (base, _), (policy, _) in zip(results[::2], results[1::2])), \
        "the adapter changes greedy output"
    cands = sampler.sample(PROMPTS[0])
    assert cands.policy_version == 1 and len(cands.completions) == 4


def test_bad_versions_are_refused_and_the_previous_one_keeps_serving(manager, peft_model, tokenizer, vllm_store,
                                                                     model_dir):
    randomize_lora_b(peft_model, seed=21)
    assert manager.apply(publish_adapter(peft_model, vllm_store, 21, model_dir))
    ids = Sampler(manager.client, tokenizer, manager, GeneratorSettings()).prompt_token_ids(PROMPTS[0])
    before, _ = vllm_greedy(manager, None, ids)

    randomize_lora_b(peft_model, seed=22)
    good = publish_adapter(peft_model, vllm_store, 22, model_dir)
    checksum_failures = failures("checksum")
    weights = vllm_store / "policy-v22" / "adapter_model.safetensors"
    with open(weights, "r+b") as f:  # flip one byte after the sha256 was taken
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(AdapterRejected, match="sha256 mismatch"):
        manager.apply(good)
    assert failures("checksum") == checksum_failures + 1

    with pytest.raises(AdapterRejected, match="no adapter_config.json"):
        manager.apply(good.model_copy(update={"path": "policy-v999"}))
    with pytest.raises(AdapterRejected, match="base model"):
        manager.apply(good.model_copy(update={"base_model": "some-other-model"}))

    assert manager.current_version == 21
    assert "policy-v22" not in served(manager.client.base_url)
    assert vllm_greedy(manager, None, ids) == (before, 21)
    shutil.rmtree(vllm_store / "policy-v22")


def test_older_versions_stay_served_after_newer_ones_apply(manager, peft_model, vllm_store, model_dir):
    """No version that can still be asked for is unloaded (tests/test_generator_unload_race.py says why)."""
    url = str(manager.client.base_url).rstrip("/")
    readies = []
    for v in (31, 32, 33, 34):
        randomize_lora_b(peft_model, seed=v)
        readies.append(publish_adapter(peft_model, vllm_store, v, model_dir))
    for ready in readies:
        assert manager.apply(ready)
    assert manager.current_version == 34 and manager.loaded_versions() == [0, 31, 32, 33, 34]
    assert {"policy-v31", "policy-v32", "policy-v33", "policy-v34", "base"} <= served(url)
    old = httpx.post(f"{url}/v1/completions", json={"model": "policy-v31", "prompt": [1, 2], "max_tokens": 1})
    assert old.status_code == 200
    with manager.using("policy-v32") as (name, version):
        assert (name, version) == ("policy-v32", 32)
    with manager.using() as (name, version):
        assert (name, version) == ("policy-v34", 34)
    assert REGISTRY.get_sample_value("odpo_generator_swap_latency_seconds_count") >= 4

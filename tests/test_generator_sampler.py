"""The zero adapter, prompt tokenization and one sampling request on a real vLLM server."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from generator.sampler import PromptRejected, Sampler
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.contracts import PromptEvent, SamplingParams
from core.settings import GeneratorSettings


CHAT = PromptEvent(id="chat-1", messages=[{"role": "user", "content": "Name three colours of the rainbow."}])
TEXT = PromptEvent(id="text-1", text="The capital of France is")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    torch.set_num_threads(1)  # vLLM computes on the other core
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_zero_adapter_is_a_peft_adapter_with_zero_b(tmp_path, model_dir, hf_model):
    from peft import PeftModel

    folder = write_zero_adapter(model_dir, tmp_path / ZERO_ADAPTER_DIR)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    weights = load_file(folder / "adapter_model.safetensors")
    a = {k: v for k, v in weights.items() if ".lora_A." in k}
    b = {k: v for k, v in weights.items() if ".lora_B." in k}
    assert len(a) == len(b) == 30 * 4
    assert all(float(v.abs().max()) == 0.0 for v in b.values())
    assert all(float(v.abs().max()) > 0.0 for v in a.values())
    assert weights["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (192, 8)

    mtime = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert write_zero_adapter(model_dir, folder) == folder
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == mtime, "a valid zero adapter is reused"

    # peft must find every tensor under its key (else it would keep its own init silently).
    peft_model = PeftModel.from_pretrained(hf_model, folder)
    try:
        loaded = dict(peft_model.named_parameters())
        key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
        assert torch.equal(loaded[key], a["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"])
        ids = torch.tensor([[1, 4093, 198, 26843, 665]])
        with torch.no_grad():
            with_zero = peft_model(ids).logits
            with peft_model.disable_adapter():
                plain = peft_model(ids).logits
        assert torch.equal(with_zero, plain)
    finally:
        peft_model.unload()


def test_prompt_token_ids_apply_the_chat_template_once(tokenizer):
    sampler = Sampler(None, tokenizer, None, GeneratorSettings())
    ids = sampler.prompt_token_ids(CHAT)
    expected = tokenizer.apply_chat_template([m.model_dump() for m in CHAT.messages], add_generation_prompt=True,
                                             tokenize=True)["input_ids"]
    assert ids == list(expected)
    text = tokenizer.decode(ids)
    assert text.count("<|im_start|>") == 3  # default system turn, the user turn, the assistant header
    assert text.endswith("<|im_start|>assistant\n")
    assert sampler.prompt_token_ids(TEXT) == tokenizer(TEXT.text)["input_ids"]


def test_too_long_prompt_is_rejected_before_any_request(tokenizer):
    sampler = Sampler(None, tokenizer, None, GeneratorSettings(max_model_len=64, max_tokens=48))
    with pytest.raises(PromptRejected, match="max_model_len=64"):
        sampler.sample(CHAT)


@pytest.mark.vllm
def test_sampler_builds_a_candidate_set_from_base(manager, tokenizer, hf_model):
    settings = GeneratorSettings(n=3, max_tokens=24, temperature=1.0, seed=7)
    sampler = Sampler(manager.client, tokenizer, manager, settings)
    cands = sampler.sample(CHAT)

    assert cands.policy_version == 0 and cands.prompt == CHAT
    assert cands.prompt_token_ids == sampler.prompt_token_ids(CHAT)
    assert cands.sampling == SamplingParams(n=3, temperature=1.0, top_p=1.0, max_tokens=24, seed=7)
    assert len(cands.completions) == 3
    assert len({tuple(c.token_ids) for c in cands.completions}) >= 2, "n samples at temperature 1 should differ"
    for c in cands.completions:
        assert c.finish_reason in ("stop", "length")
        assert (c.token_ids[-1] == tokenizer.eos_token_id) == (c.finish_reason == "stop")
        assert len(c.token_ids) <= 24 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text

    # The logprobs are the base model's, token by token (fp32 vLLM matches HF to ~1e-5).
    c = cands.completions[0]
    ids = torch.tensor([cands.prompt_token_ids + c.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0, :-1].double(), -1)
    n_prompt = len(cands.prompt_token_ids)
    hf = logp[n_prompt - 1:, :].gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(hf, torch.tensor(c.logprobs, dtype=torch.float64), atol=2e-3)

    # A text prompt goes in as its plain tokenizer ids.
    text_cands = sampler.sample(TEXT)
    assert text_cands.prompt_token_ids == tokenizer(TEXT.text)["input_ids"]


@pytest.mark.vllm
def test_greedy_with_several_samples_is_refused(tokenizer):
    with pytest.raises(ValueError, match="identical samples"):
        Sampler(None, tokenizer, None, GeneratorSettings(temperature=0.0, n=2))

"""One rolling update on real pairs with the real model: it learns, checkpoints, resumes, and guards NaN."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core.adapter_store import adapter_digest, published_versions
from core.contracts import ChatMessage, PreferencePair, PromptEvent, pair_id
from core.settings import TrainerSettings
from trainer.checkpoint import OPTIMIZER_FILE, STATE_FILE, optimizer_path
from trainer.recipe import NonFiniteWeights, Trainer, train_window

QUESTIONS = [("What colour is the sky?", "Blue.", "I do not know anything about that."),
             ("Say hi.", "Hi!", "No."),
             ("What is 2+2?", "4.", "It is probably 5 or so."),
             ("Name a fruit.", "An apple.", "Cars are fast."),
             ("Capital of France?", "Paris.", "London, in England."),
             ("Is ice cold?", "Yes, ice is cold.", "Ice is hot.")]


def make_pairs(tok, n: int = 4, policy_version: int = 0, tag: str = "") -> list[PreferencePair]:
    """Pairs as the generator would send them: chat prompt ids, completion ids ending with EOS."""
    pairs = []
    for i in range(n):
        q, c, r = QUESTIONS[i % len(QUESTIONS)]
        prompt = PromptEvent(id=f"q{tag}{i}", messages=[ChatMessage(role="user", content=q)], source="test")
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        pairs.append(PreferencePair(
            id=pair_id(prompt.id, c, r, policy_version), prompt=prompt, chosen=c, rejected=r,
            prompt_token_ids=list(ids), chosen_token_ids=tok(c)["input_ids"] + [tok.eos_token_id],
            rejected_token_ids=tok(r)["input_ids"] + [tok.eos_token_id], policy_version=policy_version,
            judge="test"))
    return pairs


# a fixed beta: the resumed trainer's loss is compared with the one that trained (kl_target adapts beta
# between windows; tests/test_trainer_kl_control.py)
SETTINGS = TrainerSettings(window_pairs=4, steps_per_window=3, batch_pairs=2, kl_target=0)


@pytest.fixture()
def trainer(model_dir):
    return Trainer.open(model_dir, SETTINGS)


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_" in n}


def test_window_learns_checkpoints_and_resumes(model_dir, trainer, tmp_path):
    window = [trainer.tokenize(p) for p in make_pairs(trainer.policy.tokenizer)]
    before_w = _lora(trainer)
    before = trainer.evaluate(window)
    assert before["loss"] == pytest.approx(0.6931, abs=1e-3)  # lora_B = 0: policy == reference
    result = train_window(trainer, window)
    assert (result.steps, result.skipped, result.pairs) == (3, 0, 4) and result.publishable
    after = trainer.evaluate(window)
    assert after["loss"] < before["loss"] - 0.02 and after["reward_margin"] > 0
    assert result.loss < result.loss_first
    changed = [n for n, w in _lora(trainer).items() if not torch.equal(w, before_w[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)

    store = tmp_path / "store"
    ckpt = trainer.publish_version(store, [p.pair_id for p in window], result, {"odpo.preferences:0": 9})
    assert ckpt.path == store / "policy-v1" and published_versions(store) == [1]
    assert ckpt.sha256 == adapter_digest(ckpt.path)
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no staging leftovers
    files = {p.name for p in ckpt.path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", STATE_FILE} <= files
    assert OPTIMIZER_FILE not in files and optimizer_path(store, 1).is_file()  # beside the version, not in it
    cfg = json.loads((ckpt.path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and set(cfg["target_modules"]) == {"q_proj", "k_proj",
                                                                                         "v_proj", "o_proj"}
    state = json.loads((ckpt.path / STATE_FILE).read_text())
    assert state["version"] == 1 and state["parent_version"] == 0 and state["offsets"] == {"odpo.preferences:0": 9}
    assert sorted(state["trained_ids"]) == sorted(p.pair_id for p in window)
    assert trainer.version == 1 and trainer.already_trained(window[0].pair_id)

    resumed = Trainer.open(model_dir, SETTINGS, store)
    assert resumed.version == 1 and resumed.already_trained(window[3].pair_id)
    assert resumed.evaluate(window)["loss"] == pytest.approx(after["loss"], abs=1e-5)
    assert len(resumed.optimizer.state) == len(trainer.optimizer.state) > 0  # AdamW moments came back


def test_a_nan_step_is_skipped_and_the_rest_trains(trainer, tmp_path):
    window = [trainer.tokenize(p) for p in make_pairs(trainer.policy.tokenizer)]
    lora_a = next(m for n, m in trainer.policy.model.named_modules() if n.endswith("q_proj.lora_A.default"))
    calls = {"n": 0}

    def poison_first_call(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 1 else output

    handle = lora_a.register_forward_hook(poison_first_call)
    try:
        result = trainer.train_window(window)
    finally:
        handle.remove()
    assert (result.skipped, result.steps) == (1, 2) and result.publishable
    ckpt = trainer.publish_version(tmp_path / "store", [p.pair_id for p in window], result)
    weights = load_file(ckpt.path / "adapter_model.safetensors")
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)


def test_poisoned_weights_are_never_published(trainer, tmp_path):
    window = [trainer.tokenize(p) for p in make_pairs(trainer.policy.tokenizer)]
    param = next(p for n, p in trainer.policy.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        param[0, 0] = float("inf")
    result = trainer.train_window(window)
    assert result.steps == 0 and result.skipped == SETTINGS.steps_per_window and not result.publishable
    store = tmp_path / "store"
    with pytest.raises(NonFiniteWeights):
        trainer.publish_version(store, [p.pair_id for p in window], result)
    assert published_versions(store) == [] and trainer.version == 0

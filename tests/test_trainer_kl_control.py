"""The drift budget: beta adapted to the measured KL per token, measured as defined, kept across restarts."""

from __future__ import annotations

import math

import pytest
import torch

from service.settings import TrainerSettings
from trainer.kl_control import MAX_CHANGE, next_beta
from trainer.logps import score_pairs
from trainer.recipe import Trainer
from trainer.tokenize import TokenizedPair


def pairs_of(n: int, tag: str = "p") -> list[TokenizedPair]:
    return [TokenizedPair(f"{tag}{i}", 0, (1, 30 + i, 40, 50), (100 + i, 101, 2), (200 + i, 2)) for i in range(n)]


def test_beta_moves_towards_the_budget_by_at_most_a_fifth_per_window_within_its_bounds():
    assert next_beta(0.1, 0.2, 0.1, 0.02, 2.0) == pytest.approx(0.1 * (1 + MAX_CHANGE))  # over budget: dearer
    assert next_beta(0.1, 0.11, 0.1, 0.02, 2.0) == pytest.approx(0.1 * 1.1)
    assert next_beta(0.1, 0.0, 0.1, 0.02, 2.0) == pytest.approx(0.1 * (1 - MAX_CHANGE))  # within: cheaper
    assert next_beta(1.9, 5.0, 0.1, 0.02, 2.0) == 2.0 and next_beta(0.021, -1.0, 0.1, 0.02, 2.0) == 0.02
    assert next_beta(0.1, 5.0, 0.0, 0.02, 2.0) == 0.1  # no budget: a fixed beta
    assert next_beta(0.1, None, 0.1, 0.02, 2.0) == 0.1  # nothing measured: unchanged


def test_drift_is_the_mean_per_token_log_ratio_of_the_responses_and_zero_for_a_fresh_adapter(tiny_model_dir):
    settings = TrainerSettings(learning_rate=5e-3, steps_per_window=3, kl_target=0.05)
    t = Trainer.open(tiny_model_dir, settings)
    first = t.train_window(pairs_of(4))
    assert first.drift == pytest.approx(0.0, abs=1e-6)  # LoRA's B starts at zero: policy == reference
    more = pairs_of(4, "q")
    # by hand, at the weights the second window starts from (lora_dropout 0: train mode computes the same)
    with torch.no_grad():
        pol = score_pairs(t.policy.model, more, t.policy.device, t.policy.pad_id).logps.float()
    ref = t.reference(more)
    ref_t = torch.stack([ref[p.pair_id] for p in more])
    lengths = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in more], dtype=torch.float32)
    expected = ((pol - ref_t) / lengths).mean().item()
    second = t.train_window(more)
    assert expected != 0.0 and second.drift == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_the_adapted_beta_is_published_with_the_version_and_resumed(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    settings = TrainerSettings(learning_rate=5e-3, steps_per_window=2, kl_target=0.05, beta=0.1)
    t = Trainer.open(tiny_model_dir, settings, store)
    r1 = t.train_window(pairs_of(4))
    t.publish_version(store, [f"p{i}" for i in range(4)], r1)
    # the first window's drift is 0, under the budget: beta falls by the most allowed
    assert r1.beta == pytest.approx(0.1) and t.state.beta == pytest.approx(0.1 * (1 - MAX_CHANGE))
    assert t.loss_params.beta == t.state.beta
    resumed = Trainer.open(tiny_model_dir, settings, store)
    assert resumed.loss_params.beta == pytest.approx(0.08)
    r2 = resumed.train_window(pairs_of(4, "q"))
    assert r2.beta == pytest.approx(0.08)
    fixed = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=1, beta=0.3))
    r = fixed.train_window(pairs_of(2))
    assert r.beta == 0.3 and fixed.next_beta(r) == 0.3  # kl_target 0: beta stays as set

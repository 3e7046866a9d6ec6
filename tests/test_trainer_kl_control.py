"""The drift budget: beta adapted to the measured KL per token, measured as defined, kept across restarts."""

from __future__ import annotations

import math

import pytest
import torch

from core.settings import TrainerSettings
from trainer.kl_control import MAX_CUT, MAX_RAISE, drift_per_token, next_beta
from trainer.recipe import Trainer
from trainer.tokenize import TokenizedPair


def pairs_of(n: int, tag: str = "p") -> list[TokenizedPair]:
    return [TokenizedPair(f"{tag}{i}", 0, (1, 30 + i, 40, 50), (100 + i, 101, 2), (200 + i, 2)) for i in range(n)]


def test_beta_moves_towards_the_budget_by_at_most_a_fifth_per_window_within_its_bounds():
    assert next_beta(0.1, 0.2, 0.1, 0.02, 2.0) == pytest.approx(0.1 * (1 + MAX_RAISE))  # over budget: dearer
    assert next_beta(0.1, 0.13, 0.1, 0.02, 2.0) == pytest.approx(0.1 * 1.3)
    assert next_beta(0.1, 0.11, 0.1, 0.02, 2.0) == pytest.approx(0.1 * 1.1)
    assert next_beta(0.1, 0.0, 0.1, 0.02, 2.0) == pytest.approx(0.1 * (1 - MAX_CUT))  # within: cheaper, slower
    assert next_beta(1.9, 5.0, 0.1, 0.02, 2.0) == 2.0 and next_beta(0.021, -1.0, 0.1, 0.02, 2.0) == 0.02
    assert next_beta(0.1, 5.0, 0.0, 0.02, 2.0) == 0.1  # no budget: a fixed beta
    assert next_beta(0.1, None, 0.1, 0.02, 2.0) == 0.1  # nothing measured: unchanged


def test_drift_is_the_sampler_to_reference_log_ratio_per_token_of_the_sampled_responses(tiny_model_dir):
    t = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=1))
    plain = pairs_of(2)
    assert math.isnan(t.train_window(plain).drift)  # no sampler log-probs: nothing measured
    sampled = [TokenizedPair(f"s{i}", 1, p.prompt_ids, p.chosen_ids, p.rejected_ids,
                             tuple(-0.5 - 0.1 * k for k in range(len(p.chosen_ids))),
                             tuple(-2.0 for _ in p.rejected_ids)) for i, p in enumerate(pairs_of(3))]
    ref = t.reference(sampled)
    expected = []
    for p in sampled:
        expected.append((sum(p.chosen_logprobs) - ref[p.pair_id][0].item()) / len(p.chosen_ids))
        expected.append((sum(p.rejected_logprobs) - ref[p.pair_id][1].item()) / len(p.rejected_ids))
    old = TokenizedPair("old", 0, (1, 9), (10, 2), (11, 2), (5.0, 5.0), (5.0, 5.0))  # an older sampler's
    # the plain pairs add nothing to the mean; the older version's pair is not the newest drift
    result = t.train_window(sampled + plain + [old])
    assert result.drift == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    misaligned = [TokenizedPair("m", 0, (1, 2), (5, 6, 7), (8, 2), (-1.0,), None)]
    assert drift_per_token(misaligned, {"m": torch.zeros(2)}) is None  # log-probs not of these tokens


def test_the_adapted_beta_is_published_with_the_version_and_resumed(tiny_model_dir, tmp_path):
    store = tmp_path / "store"
    settings = TrainerSettings(learning_rate=5e-3, steps_per_window=2, kl_target=0.05, beta=0.1)
    t = Trainer.open(tiny_model_dir, settings, store)
    # the sampler found these responses far likelier than the reference does: far over the budget
    hot = [TokenizedPair(f"h{i}", 0, p.prompt_ids, p.chosen_ids, p.rejected_ids, tuple(0.0 for _ in p.chosen_ids),
                         tuple(0.0 for _ in p.rejected_ids)) for i, p in enumerate(pairs_of(4))]
    r1 = t.train_window(hot)
    assert r1.drift > 0.05 * (1 + MAX_RAISE)  # far enough over for the largest rise
    t.publish_version(store, [p.pair_id for p in hot], r1)
    assert r1.beta == pytest.approx(0.1) and t.state.beta == pytest.approx(0.1 * (1 + MAX_RAISE))
    assert t.loss_params.beta == t.state.beta
    resumed = Trainer.open(tiny_model_dir, settings, store)
    assert resumed.loss_params.beta == pytest.approx(0.1 * (1 + MAX_RAISE))
    fixed_now = Trainer.open(tiny_model_dir, settings.model_copy(update={"kl_target": 0.0, "beta": 0.3}), store)
    assert fixed_now.loss_params.beta == 0.3  # an operator who fixes beta again gets the beta they set
    r2 = resumed.train_window(pairs_of(4, "q"))
    assert r2.beta == pytest.approx(0.15) and resumed.next_beta(r2) == pytest.approx(0.15)  # nothing measured
    fixed = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=1, beta=0.3, kl_target=0))
    r = fixed.train_window(hot[:2])
    assert r.beta == 0.3 and fixed.next_beta(r) == 0.3  # kl_target 0: beta stays as set

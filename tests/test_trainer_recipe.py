"""The recipe's knobs on a tiny local Llama: LR schedule, step composition, resume, sampler agreement."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_scheduler

from core.contracts import PreferencePair, PromptEvent, pair_id
from core.settings import TrainerSettings
from trainer import metrics as M
from trainer.logps import score_pairs
from trainer.recipe import Trainer
from trainer.schedule import lr_at
from trainer.tokenize import TokenizedPair


@pytest.mark.parametrize("kind,transformers_name", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                                    ("cosine", "cosine")])
def test_schedule_equals_transformers(kind, transformers_name):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-4)
    sched = get_scheduler(transformers_name, opt, num_warmup_steps=3, num_training_steps=12)
    for step in range(12):
        assert lr_at(step, 2e-4, kind, warmup_steps=3, decay_steps=12) == pytest.approx(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lr_at(50, 2e-4, "cosine", 3, 12, min_lr_ratio=0.1) == pytest.approx(2e-5)  # stays at the floor


def pairs_of(n: int, version: int = 0) -> list[TokenizedPair]:
    return [TokenizedPair(f"p{i}", version, (1, 30 + i, 40, 50), (100 + i, 101, 2), (200 + i, 2)) for i in range(n)]


def test_steps_walk_the_window_step_pairs_at_a_time(tiny_model_dir):
    pairs = pairs_of(5)
    t = Trainer.open(tiny_model_dir, TrainerSettings(step_pairs=2, steps_per_window=4))
    assert [[p.pair_id for p in s] for s in t.step_batches(pairs)] == [["p0", "p1"], ["p2", "p3"], ["p4"],
                                                                        ["p0", "p1"]]
    whole = Trainer(t.policy, TrainerSettings(steps_per_window=2))
    assert [len(s) for s in whole.step_batches(pairs)] == [5, 5]  # step_pairs 0: the whole window each step
    shuffled = Trainer(t.policy, TrainerSettings(step_pairs=5, steps_per_window=2, shuffle=True, seed=3))
    a, b = shuffled.step_batches(pairs)
    assert sorted(p.pair_id for p in a) == sorted(p.pair_id for p in b) == [f"p{i}" for i in range(5)]
    assert [p.pair_id for p in a] != [p.pair_id for p in b]  # a new order every pass ...
    assert shuffled.step_batches(pairs) == [a, b]  # ... and the same one for the same seed and version


def test_schedule_runs_on_the_global_step_across_versions_and_restarts(tiny_model_dir, tmp_path):
    settings = TrainerSettings(learning_rate=1e-3, lr_scheduler="linear", warmup_steps=2, decay_steps=10,
                               steps_per_window=3, step_pairs=2)
    store = tmp_path / "store"
    t = Trainer.open(tiny_model_dir, settings, store)
    r1 = t.train_window(pairs_of(4))
    assert r1.steps == 3 and r1.learning_rate == pytest.approx(lr_at(2, 1e-3, "linear", 2, 10))
    t.publish_version(store, [f"p{i}" for i in range(4)], r1)
    resumed = Trainer.open(tiny_model_dir, settings, store)
    assert resumed.optimizer_steps == resumed.state.optimizer_steps == 3
    more = [TokenizedPair(f"q{i}", 0, p.prompt_ids, p.chosen_ids, p.rejected_ids) for i, p in enumerate(pairs_of(4))]
    r2 = resumed.train_window(more)
    assert r2.learning_rate == pytest.approx(lr_at(5, 1e-3, "linear", 2, 10))
    assert len(r2.step_losses) == 3 and r2.step_losses[-1] == r2.loss


def test_sampler_logprobs_are_compared_on_policy_only(tiny_model_dir):
    """Pairs sampled by the version the trainer holds: mean |ours - sampler| per token, others ignored."""
    t = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=2, step_pairs=2, batch_pairs=1))
    base = pairs_of(3)
    with torch.no_grad():
        own = score_pairs(t.policy.model, base, t.policy.device, t.policy.pad_id).token_logps

    def sampled(p, lps, offset, version=0):
        return TokenizedPair(p.pair_id, version, p.prompt_ids, p.chosen_ids, p.rejected_ids,
                             tuple(x + offset for x in lps[0].tolist()), tuple(x + offset for x in lps[1].tolist()))

    window = [sampled(base[0], own[0], 0.0), sampled(base[1], own[1], 0.25), base[2]]
    gauge_before = M.PAIR_LOGPROB_MISMATCH._sum.get()
    result = t.train_window(window)
    assert len(result.logprob_mismatch) == 2  # the pair without sampler log-probs is not compared
    assert result.logprob_mismatch[0] < 1e-5 and result.logprob_mismatch[1] == pytest.approx(0.25, abs=1e-5)
    M.record_window(result)
    assert M.LOGPROB_MISMATCH._value.get() == pytest.approx(0.125, abs=1e-5)
    assert M.PAIR_LOGPROB_MISMATCH._sum.get() - gauge_before == pytest.approx(0.25, abs=1e-4)
    stale = t.train_window([sampled(base[0], own[0], 0.0, version=1)])  # not sampled by version 0
    assert stale.logprob_mismatch == []


def test_text_pairs_train_and_a_nan_free_window_publishes_trl_metrics(tiny_model_dir, tmp_path):
    t = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=2, rpo_alpha=0.5))
    prompt = PromptEvent(id="t", text="Question: 2+2?\nAnswer: ")
    pair = PreferencePair(id=pair_id("t", "4", "5", 0), prompt=prompt, chosen="4", rejected="5", policy_version=0,
                          judge="test")
    result = t.train_window([t.tokenize(pair)])
    m = result.train_metrics().model_dump()
    for key in ("logps_chosen", "logps_rejected", "logits_chosen", "logits_rejected", "grad_norm", "learning_rate"):
        assert math.isfinite(m[key]), key
    assert result.loss_first > math.log(2)  # the SFT term adds the chosen NLL to log 2 at the start


def test_bf16_autocast_path_trains_and_stays_near_fp32(tiny_model_dir):
    """The GPU's precision path, run here on the CPU's bf16 autocast: same code, numbers near float32's."""
    pairs = pairs_of(3)
    fp32 = Trainer.open(tiny_model_dir, TrainerSettings(steps_per_window=1))
    bf16 = Trainer(fp32.policy, TrainerSettings(steps_per_window=1, precision="bf16"))
    with torch.no_grad():
        ref32, ref16 = fp32.reference(pairs), bf16.reference(pairs)
    for p in pairs:
        assert ref16[p.pair_id].dtype == torch.float32
        assert torch.allclose(ref16[p.pair_id], ref32[p.pair_id], rtol=0.05)
    result = bf16.train_window(pairs)
    assert result.publishable and math.isfinite(result.loss) and bf16.weights_finite()

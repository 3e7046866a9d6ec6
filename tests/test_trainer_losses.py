"""The sigmoid DPO loss and its rewards against the formula computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import LOSSES, reward_metrics, sigmoid_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_loss_matches_the_formula(label_smoothing):
    beta = 0.1
    pc, pr = [-10.0, -20.0, -7.5], [-12.0, -15.0, -7.5]
    rc, rr = [-11.0, -18.0, -8.0], [-11.5, -16.0, -6.0]
    out = sigmoid_loss(torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta=beta,
                       label_smoothing=label_smoothing)
    for i in range(3):
        h = (pc[i] - pr[i]) - (rc[i] - rr[i])
        want = -(1 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h)
        assert out.losses[i].item() == pytest.approx(want, abs=1e-6)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), abs=1e-6)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]), abs=1e-6)


def test_equal_policy_and_reference_give_log2_and_zero_rewards():
    x = torch.tensor([-3.0, -40.0])
    out = sigmoid_loss(x, x - 1, x, x - 1, beta=0.5)
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)))
    assert torch.equal(out.chosen_rewards, torch.zeros(2))


def test_reward_metrics_and_gradient_direction():
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -4.0], requires_grad=True)
    ref = torch.tensor([-11.0, -5.0])
    out = LOSSES["sigmoid"](pc, pr, ref, ref, beta=0.1)
    m = reward_metrics(out)
    assert m["reward_chosen"] == pytest.approx(0.1 * ((1.0 + 0.0) / 2), abs=1e-6)
    assert m["reward_rejected"] == pytest.approx(0.1 * ((-1.0 + 1.0) / 2), abs=1e-6)
    assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"], abs=1e-6)
    assert m["reward_accuracy"] == 0.5  # pair 0: chosen wins; pair 1: rejected wins
    out.losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen and lowers rejected
    assert not out.chosen_rewards.requires_grad  # rewards are metrics, never part of the graph

"""Every DPO loss type against its paper's formula computed by hand in plain floats, and what they share."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from core.settings import TrainerSettings
from trainer.losses import LOSSES, LossParams, PairLogps, dpo_loss, reward_metrics

PC, PR = [-10.0, -20.0, -7.5, -30.0], [-12.0, -15.0, -7.5, -26.0]  # policy chosen / rejected
RC, RR = [-11.0, -18.0, -8.0, -31.0], [-11.5, -16.0, -6.0, -25.0]  # reference
LC, LR = [5.0, 12.0, 3.0, 20.0], [7.0, 9.0, 3.0, 16.0]  # completion lengths


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(kind: str, i: int, beta: float, eps: float, tau: float = 0.05) -> float:
    hw, hl = PC[i] - RC[i], PR[i] - RR[i]  # log-ratios of each side
    h = hw - hl
    z = beta * h
    if kind == "sigmoid":
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    if kind == "ipo":
        return (hw / LC[i] - hl / LR[i] - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - z)
    if kind == "robust":
        return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    if kind == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if kind == "nca_pair":
        return -logsig(beta * hw) - 0.5 * logsig(-beta * hw) - 0.5 * logsig(-beta * hl)
    if kind == "bco_pair":
        return -logsig(beta * hw) - logsig(-beta * hl)
    if kind == "sppo_hard":
        return (hw - 0.5 / beta) ** 2 + (hl + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return (1 - sig(beta * hw)) + sig(beta * hl)
    if kind == "apo_down":
        return sig(beta * hw) + (1 - sig(beta * (hw - hl)))
    if kind == "discopop":
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + math.exp(-z) * m
    if kind == "aot":  # sorted log-ratio of the policy minus sorted log-ratio of the reference, over the batch
        rho = sorted(PC[j] - PR[j] for j in range(len(PC)))
        rho_ref = sorted(RC[j] - RR[j] for j in range(len(PC)))
        d = beta * (rho[i] - rho_ref[i])
        return -(1 - eps) * logsig(d) - eps * logsig(-d)
    raise AssertionError(kind)


def batch(requires_grad: bool = False) -> PairLogps:
    def t(xs, grad=False):
        return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)

    return PairLogps(t(PC, requires_grad), t(PR, requires_grad), t(RC), t(RR), t(LC), t(LR))


@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1)])
def test_each_loss_matches_its_formula(kind, beta, eps):
    if kind == "exo_pair" and eps == 0:
        eps = 1e-3  # its epsilon must be > 0
    out = dpo_loss(batch(), LossParams(beta=beta, label_smoothing=eps), kind)
    assert out.losses.shape == (4,)
    for i in range(4):
        assert out.losses[i].item() == pytest.approx(by_hand(kind, i, beta, eps), rel=1e-9, abs=1e-12)


def test_settings_offer_exactly_the_implemented_losses():
    assert set(typing.get_args(TrainerSettings.model_fields["loss_type"].annotation)) == set(LOSSES)


@pytest.mark.parametrize("kind", sorted(set(LOSSES) - {"discopop"}))
def test_descent_prefers_chosen(kind):
    """At policy == reference, the gradient raises the chosen-minus-rejected margin.

    Not DiscoPOP's: it is non-convex around h = 0, where the slope of its modulation sigma(z / tau)
    (1 / (4 tau) = 5 at tau = 0.05) outweighs the rest and the gradient points the other way.
    """
    x = torch.tensor([-10.0, -20.0], dtype=torch.float64)
    pc, pr = x.clone().requires_grad_(), (x - 1).clone().requires_grad_()
    b = PairLogps(pc, pr, x, x - 1, torch.tensor([5.0, 9.0]), torch.tensor([6.0, 8.0]))
    dpo_loss(b, LossParams(beta=0.1, label_smoothing=1e-3), kind).losses.sum().backward()
    assert (pc.grad - pr.grad < 0).all(), (pc.grad, pr.grad)  # d loss / d margin < 0


def test_rewards_and_metrics_are_the_same_for_every_type():
    b = batch()
    outs = [dpo_loss(b, LossParams(beta=0.1, label_smoothing=1e-3), kind) for kind in LOSSES]
    for out in outs:
        assert torch.equal(out.chosen_rewards, outs[0].chosen_rewards)
    m = reward_metrics(outs[0])
    chosen = [0.1 * (PC[i] - RC[i]) for i in range(4)]
    rejected = [0.1 * (PR[i] - RR[i]) for i in range(4)]
    assert m["reward_chosen"] == pytest.approx(sum(chosen) / 4)
    assert m["reward_rejected"] == pytest.approx(sum(rejected) / 4)
    assert m["reward_margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 4)
    assert m["reward_accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / 4
    assert not outs[0].chosen_rewards.requires_grad


def test_equal_policy_and_reference_give_log2():
    x = torch.tensor([-3.0, -40.0])
    out = dpo_loss(PairLogps(x, x - 1, x, x - 1, torch.ones(2), torch.ones(2)), LossParams(beta=0.5), "sigmoid")
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)))
    assert torch.equal(out.chosen_rewards, torch.zeros(2))


def test_rpo_objective_splits_exactly_over_micro_batches():
    """Shares of micro-batches sum to the loss of the whole batch: mean pair loss + alpha * NLL per chosen token."""
    b, params, alpha = batch(), LossParams(beta=0.1), 0.7
    whole = dpo_loss(b, params, "sigmoid")
    want = whole.losses.mean().item() + alpha * (-sum(PC) / sum(LC))
    assert whole.objective(4, int(sum(LC)), alpha).item() == pytest.approx(want, rel=1e-12)
    halves = [PairLogps(*(getattr(b, f)[s] for f in ("policy_chosen", "policy_rejected", "ref_chosen",
                                                       "ref_rejected", "chosen_tokens", "rejected_tokens")))
              for s in (slice(0, 2), slice(2, 4))]
    shares = sum(dpo_loss(h, params, "sigmoid").objective(4, int(sum(LC)), alpha).item() for h in halves)
    assert shares == pytest.approx(want, rel=1e-12)
    assert whole.objective(4, int(sum(LC)), 0.0).item() == pytest.approx(whole.losses.mean().item())


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(batch(), LossParams(), "kto")

"""Completion log-probs (packed pairs and padded rows) against a plain per-sequence HF computation on the real model."""

from __future__ import annotations

import pytest
import torch

from core.settings import TrainerSettings
from trainer.logps import pair_logps, reference_logps, score_pairs, sequence_logps
from trainer.model import load_policy
from trainer.tokenize import TokenizedPair


@pytest.fixture(scope="module")
def policy(model_dir):
    pol = load_policy(model_dir, TrainerSettings())
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero adapter, so policy and reference differ
        for name, p in pol.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pol.model.eval()
    return pol


def _pairs(tok) -> list[TokenizedPair]:
    out = []
    for i, (q, c, r) in enumerate([("Hi", "Hello there!", "Go away."),
                                   ("Write a long sentence about the sea and its many colours.", "Blue.",
                                    "The sea is vast, deep and changes colour with the weather and the light."),
                                   ("2+2?", "4", "5")]):
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        eos = [tok.eos_token_id]
        out.append(TokenizedPair(f"p{i}", 0, tuple(p), tuple(tok(c)["input_ids"] + eos),
                                 tuple(tok(r)["input_ids"] + eos)))
    return out


def _plain_logp(model, prompt, completion) -> float:
    """Straightforward HF: full forward of the unpadded sequence, log_softmax, gather the completion tokens."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = len(prompt)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(n, ids.shape[1]))


def test_batched_logps_match_per_sequence_hf(policy):
    pairs = _pairs(policy.tokenizer)
    with torch.no_grad():
        got = pair_logps(policy.model, pairs, policy.device, policy.pad_id)
    assert got.shape == (3, 2)
    for i, p in enumerate(pairs):
        assert got[i, 0].item() == pytest.approx(_plain_logp(policy.model, p.prompt_ids, p.chosen_ids), abs=1e-3)
        assert got[i, 1].item() == pytest.approx(_plain_logp(policy.model, p.prompt_ids, p.rejected_ids), abs=1e-3)


def test_reference_is_the_model_without_adapter(policy):
    pairs = _pairs(policy.tokenizer)
    ref = reference_logps(policy.model, pairs, policy.device, policy.pad_id, forward_tokens=400)
    with torch.no_grad():
        pol = pair_logps(policy.model, pairs, policy.device, policy.pad_id)
    with policy.model.disable_adapter():
        plain = [_plain_logp(policy.model, p.prompt_ids, p.chosen_ids) for p in pairs]
    assert ref[:, 0].tolist() == pytest.approx(plain, abs=1e-3)
    assert (ref - pol).abs().max().item() > 1e-2  # the adapter does change the numbers
    assert not ref.requires_grad


def test_masking_prompt_never_scored_eos_scored_padding_inert(policy):
    tok, model, dev, pad = policy.tokenizer, policy.model, policy.device, policy.pad_id
    p = _pairs(tok)[0]
    short, long_ = p.chosen_ids, p.rejected_ids + tuple(tok(" and more words here to pad")["input_ids"])
    with torch.no_grad():
        alone = sequence_logps(model, [(p.prompt_ids, short)], dev, pad)[0].item()
        batched = sequence_logps(model, [(p.prompt_ids, short), (p.prompt_ids, long_)], dev, pad)[0].item()
        no_eos = sequence_logps(model, [(p.prompt_ids, short[:-1])], dev, pad)[0].item()
        # moving tokens from the completion into the prompt removes exactly their log-probs
        shifted = sequence_logps(model, [(p.prompt_ids + short[:1], short[1:])], dev, pad)[0].item()
        logprobs = model(input_ids=torch.tensor([list(p.prompt_ids + short)])).logits[0].log_softmax(-1)
    n = len(p.prompt_ids)
    assert batched == pytest.approx(alone, abs=1e-4)  # right padding does not leak into real tokens
    eos_lp = logprobs[n + len(short) - 2, tok.eos_token_id].item()
    assert eos_lp < -1e-3 and alone - no_eos == pytest.approx(eos_lp, abs=1e-3)  # EOS is scored
    first_lp = logprobs[n - 1, short[0]].item()
    assert alone - shifted == pytest.approx(first_lp, abs=1e-3)  # only completion positions count


def test_gradients_reach_only_the_lora_weights(policy):
    pairs = _pairs(policy.tokenizer)[:2]
    policy.model.zero_grad(set_to_none=True)
    pair_logps(policy.model, pairs, policy.device, policy.pad_id).sum().backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    policy.model.zero_grad(set_to_none=True)


def test_packed_pairs_equal_padded_rows_and_plain_hf(policy, monkeypatch):
    """Prompt computed once for both sides (packed) = prompt computed per side (padded) = one plain forward each."""
    pairs = _pairs(policy.tokenizer)
    model, dev, pad = policy.model, policy.device, policy.pad_id
    with torch.no_grad():
        one_each = score_pairs(model, pairs, dev, pad, forward_tokens=0)
        shared = score_pairs(model, pairs, dev, pad, forward_tokens=10_000)  # all pairs in one padded forward
        monkeypatch.setattr("trainer.logps.packable", lambda config: False)  # as for a sliding-window model
        padded_scored = score_pairs(model, pairs, dev, pad)
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        padded = sequence_logps(model, rows, dev, pad).reshape(2, -1).T
    assert torch.equal(padded_scored.logps, padded)
    assert (padded_scored.mean_logit_sums - one_each.mean_logit_sums).abs().max().item() < 1e-2
    plain = torch.tensor([[_plain_logp(model, p.prompt_ids, s) for s in (p.chosen_ids, p.rejected_ids)] for p in pairs])
    assert (one_each.logps - padded).abs().max().item() < 1e-4
    assert (shared.logps - one_each.logps).abs().max().item() < 1e-4
    assert (one_each.logps - plain).abs().max().item() < 2e-3  # log_softmax+gather drifts (notes/trl-dpo.md)
    assert torch.isfinite(shared.logps).all()
    for p, (c, r) in zip(pairs, one_each.token_logps):
        assert (len(c), len(r)) == (len(p.chosen_ids), len(p.rejected_ids))
    assert one_each.lengths.tolist() == [[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]
    assert one_each.mean_logit_sums.shape == (3, 2) and not one_each.mean_logit_sums.requires_grad


def test_eager_attention_takes_the_additive_mask(policy):
    """The eager kernel adds its mask to the scores; the packed path gives it one and gets the same numbers."""
    pairs = _pairs(policy.tokenizer)
    config = policy.model.get_base_model().config
    with torch.no_grad():
        sdpa = pair_logps(policy.model, pairs, policy.device, policy.pad_id)
        config._attn_implementation = "eager"
        try:
            eager = pair_logps(policy.model, pairs, policy.device, policy.pad_id)
        finally:
            config._attn_implementation = "sdpa"
    assert (sdpa - eager).abs().max().item() < 1e-3

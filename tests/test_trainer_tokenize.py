"""Pair tokenization: generator ids as given, others the way TRL 1.16 tokenizes them."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from core.contracts import ChatMessage, PreferencePair, PromptEvent, pair_id
from trainer.tokenize import UntrainablePair, tokenize_pair


@pytest.fixture(scope="module")
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _chat_ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


def _pair(prompt: PromptEvent, chosen: str, rejected: str, **ids) -> PreferencePair:
    return PreferencePair(id=pair_id(prompt.id, chosen, rejected, 0), prompt=prompt, chosen=chosen,
                          rejected=rejected, policy_version=0, judge="test", **ids)


def test_chat_pair_without_ids_follows_trl(tok):
    prompt = PromptEvent(id="c1", messages=[ChatMessage(role="user", content="Name a colour.")])
    pair = _pair(prompt, "Blue.", "I cannot answer that.")
    tp = tokenize_pair(pair, tok, max_length=512)
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert list(tp.prompt_ids) == _chat_ids(tok, msgs, add_generation_prompt=True)
    for side, text in ((tp.chosen_ids, "Blue."), (tp.rejected_ids, "I cannot answer that.")):
        full = _chat_ids(tok, msgs + [{"role": "assistant", "content": text}])
        assert list(tp.prompt_ids) + list(side) == full  # prompt ids are a prefix of the full ids
        assert tok.decode(side).endswith("<|im_end|>\n") and tok.decode(side).startswith(text)
        assert side[-2] == tok.eos_token_id  # <|im_end|> is EOS: it is scored
    assert "<|im_start|>system" in tok.decode(tp.prompt_ids)  # SmolLM2's default system turn


def test_text_pair_appends_eos_and_splits_at_the_common_prefix(tok):
    # A prompt ending in a space: " Paris" is one token, so TRL scores that space as completion.
    prompt = PromptEvent(id="t1", text="Question: what is the capital of France?\nAnswer: ")
    pair = _pair(prompt, "Paris", "London")
    tp = tokenize_pair(pair, tok, max_length=512)
    text = prompt.text
    full_chosen = tok(text + "Paris" + tok.eos_token)["input_ids"]
    assert list(tp.prompt_ids) + list(tp.chosen_ids) == full_chosen
    assert list(tp.prompt_ids) + list(tp.rejected_ids) == tok(text + "London" + tok.eos_token)["input_ids"]
    prompt_alone = tok(text)["input_ids"]
    assert len(tp.prompt_ids) < len(prompt_alone)  # the merged boundary token went to the completion
    assert list(tp.prompt_ids) == prompt_alone[: len(tp.prompt_ids)]
    assert tp.chosen_ids[-1] == tok.eos_token_id and tp.rejected_ids[-1] == tok.eos_token_id
    # EOS already present is not appended twice
    tp2 = tokenize_pair(_pair(prompt, "Paris" + tok.eos_token, "London"), tok, max_length=512)
    assert tp2.chosen_ids == tp.chosen_ids


def test_pairs_with_ids_are_used_as_given(tok):
    prompt = PromptEvent(id="g1", messages=[ChatMessage(role="user", content="Hi")])
    # ids deliberately unlike the text's own tokens: the sampled ids win
    pair = _pair(prompt, "hello", "bye", prompt_token_ids=[1, 2, 3], chosen_token_ids=[10, 11, 2],
                 rejected_token_ids=[12, 13])
    tp = tokenize_pair(pair, tok, max_length=512)
    assert (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids) == ((1, 2, 3), (10, 11, 2), (12, 13))
    assert tp.pair_id == pair.id and tp.policy_version == 0


def test_truncation_and_untrainable_pairs(tok):
    prompt = PromptEvent(id="g2", text="x")
    pair = _pair(prompt, "a", "b", prompt_token_ids=[5] * 6, chosen_token_ids=[7] * 10, rejected_token_ids=[8, 2])
    tp = tokenize_pair(pair, tok, max_length=8)
    assert tp.chosen_ids == (7, 7) and tp.rejected_ids == (8, 2)  # cut to the first max_length tokens
    with pytest.raises(UntrainablePair, match="prompt has 6 tokens"):
        tokenize_pair(pair, tok, max_length=6)
    bad = _pair(prompt, "a", "b", prompt_token_ids=[5], chosen_token_ids=[len(tok) + 10], rejected_token_ids=[8])
    with pytest.raises(UntrainablePair, match="outside the vocabulary"):
        tokenize_pair(bad, tok, max_length=64)

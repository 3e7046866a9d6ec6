"""PreferencePair -> token ids, the way the policy saw them (generator ids) or the way TRL 1.16 builds them.

Pairs sampled by the generator carry the exact ids the server was prompted
with and sampled (a completion that stopped ends with EOS); those are used
as given, so the trainer scores exactly what the policy produced.

Pairs without ids (human feedback, JSONL datasets) follow TRL 1.16's
DPOTrainer (see notes/trl-dpo.md):
- plain text: `tok(prompt)`, `tok(prompt + chosen + eos)`,
  `tok(prompt + rejected + eos)` (EOS appended as text unless already there);
- chat messages: `apply_chat_template(prompt, add_generation_prompt=True)` and
  `apply_chat_template(prompt + [assistant turn])`, no EOS appended (the
  template ends the turn with `<|im_end|>\\n` for SmolLM2).
The prompt length is the shorter of the two common prefixes between the
prompt ids and each full sequence, so a token merged across the boundary is
scored as completion, as TRL does. Sequences are cut to their first
`max_length` tokens; a pair whose prompt alone reaches `max_length` cannot
be trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from core.contracts import PreferencePair


class UntrainablePair(ValueError):
    """A valid pair the trainer cannot use (too long, ids outside the vocabulary)."""


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: str
    policy_version: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    # the sampler's per-token log-probs of chosen/rejected (generator pairs), aligned with the ids kept
    chosen_logprobs: tuple[float, ...] | None = None
    rejected_logprobs: tuple[float, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def tokenize_pair(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  vocab_size: int | None = None) -> TokenizedPair:
    """Token ids of one pair; raises `UntrainablePair` when it cannot be trained."""
    if pair.has_token_ids:
        prompt, chosen, rejected = list(pair.prompt_token_ids), list(pair.chosen_token_ids), list(pair.rejected_token_ids)
    elif pair.prompt.messages is not None:
        prompt, chosen, rejected = _chat_ids(pair, tokenizer)
    else:
        prompt, chosen, rejected = _text_ids(pair, tokenizer)
    if len(prompt) >= max_length:
        raise UntrainablePair(f"prompt has {len(prompt)} tokens, max_length is {max_length}")
    if not prompt:  # the first completion token would have nothing to be predicted from
        raise UntrainablePair("the prompt has no tokens of its own (it merges into the completion)")
    if not chosen or not rejected:
        raise UntrainablePair("a completion has no tokens")
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    limit = vocab_size if vocab_size is not None else len(tokenizer)
    if max(prompt + chosen + rejected) >= limit:
        raise UntrainablePair(f"a token id is outside the vocabulary of {limit}")
    sampled = pair.has_token_ids and pair.chosen_logprobs is not None and pair.rejected_logprobs is not None
    return TokenizedPair(pair.id, pair.policy_version, tuple(prompt), tuple(chosen), tuple(rejected),
                         tuple(pair.chosen_logprobs[: len(chosen)]) if sampled else None,
                         tuple(pair.rejected_logprobs[: len(rejected)]) if sampled else None)


def _split(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int]):
    n = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    return chosen_full[:n], chosen_full[n:], rejected_full[n:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _text_ids(pair: PreferencePair, tok: PreTrainedTokenizerBase):
    eos = tok.eos_token or ""
    text = pair.prompt.text or ""

    def with_eos(s: str) -> str:
        return s if s.endswith(eos) else s + eos

    prompt_ids = tok(text)["input_ids"]
    return _split(prompt_ids, tok(text + with_eos(pair.chosen))["input_ids"],
                  tok(text + with_eos(pair.rejected))["input_ids"])


def _chat_ids(pair: PreferencePair, tok: PreTrainedTokenizerBase):
    messages = [m.model_dump() for m in pair.prompt.messages]

    def ids(msgs, **kw) -> list[int]:
        out = tok.apply_chat_template(msgs, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding

    prompt_ids = ids(messages, add_generation_prompt=True)
    return _split(prompt_ids, ids(messages + [{"role": "assistant", "content": pair.chosen}]),
                  ids(messages + [{"role": "assistant", "content": pair.rejected}]))

"""Completion log-probabilities of chosen and rejected under a (LoRA) causal LM.

logp(completion | prompt) = sum over completion tokens t of log p(y_t | x, y_<t),
at temperature 1; the prompt is never scored, a trailing EOS is.

Packed pairs (the fast path): one row per pair holds `prompt + chosen +
rejected`, with position ids that restart at len(prompt) for rejected and a
4D attention mask in which rejected tokens see the prompt but not chosen. So
the prompt is computed once for both sides (the prompt-KV reuse of a cache,
in a single forward) and nothing is padded: a pair costs exactly its own
tokens. Rows of several pairs share one forward only when
`forward_tokens` allows (padding is then the price of fewer, larger calls,
worth it on a GPU). Models whose attention cannot take such a mask
(flash-attention kernels, sliding windows) use padded rows instead: chosen
and rejected each right-padded to the longest row, prompt computed twice.

Only scored positions go through the LM head, and each log-prob is taken as
`z_target - logsumexp(z)`: the form TRL's chunked head uses, which matches it
to ~1e-5 per pair on summed logps (notes/trl-dpo.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.tokenize import TokenizedPair


@dataclass
class Scored:
    """What one pass over pairs yields: sums carry the gradient, everything else is detached."""

    logps: torch.Tensor  # [pairs, 2] summed completion log-probs, column 0 chosen, 1 rejected
    token_logps: list[tuple[torch.Tensor, torch.Tensor]]  # per pair: chosen and rejected per-token log-probs
    mean_logit_sums: torch.Tensor  # [pairs, 2] sum over completion tokens of the mean logit (TRL's logits/*)
    lengths: torch.Tensor  # [pairs, 2] completion tokens


def score_pairs(model, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int,
                forward_tokens: int = 0) -> Scored:
    """Chosen and rejected log-probs of `pairs` under `model`; gradients flow when the caller allows them.

    `forward_tokens` bounds the tokens of one forward on the packed path (rows x longest row);
    0 puts one pair in each forward, which wastes nothing on a CPU.
    """
    if not pairs:
        empty = torch.zeros((0, 2))
        return Scored(empty.to(device), [], empty, empty.long())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = [None] * len(pairs)  # type: ignore
    if packable(base.config):
        for group in _groups(pairs, forward_tokens):
            for i, out in zip(group, _packed_forward(model, base, [pairs[i] for i in group], device, pad_id)):
                sides[i] = out
    else:
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        per_row = _padded_forward(model, base, rows, device, pad_id)
        n = len(pairs)
        sides = [(per_row[i][0], per_row[n + i][0], per_row[i][1], per_row[n + i][1]) for i in range(n)]
    return Scored(
        logps=torch.stack([torch.stack([c.sum(), r.sum()]) for c, r, _, _ in sides]),
        token_logps=[(c.detach(), r.detach()) for c, r, _, _ in sides],
        mean_logit_sums=torch.stack([torch.stack([mc.sum(), mr.sum()]) for _, _, mc, mr in sides]).cpu(),
        lengths=torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]),
    )


def pair_logps(model, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int) -> torch.Tensor:
    """[pairs, 2] summed log-probs (column 0 chosen, 1 rejected)."""
    return score_pairs(model, pairs, device, pad_id).logps


@torch.no_grad()
def reference_logps(model, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int,
                    forward_tokens: int = 0) -> torch.Tensor:
    """[pairs, 2] log-probs under the reference: the same model with its adapter disabled.

    The reference never changes, so a window computes this once per pair and reuses it for every step.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return score_pairs(model, pairs, device, pad_id, forward_tokens).logps
    finally:
        model.train(was_training)


def packable(config) -> bool:
    """Whether the model's attention takes an explicit 4D mask and plain position ids (Llama-like)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager") and not sliding


def _plain_head(config) -> bool:
    """True when the logits are exactly `lm_head(last hidden state)`, as for Llama/SmolLM2."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _groups(pairs: Sequence[TokenizedPair], forward_tokens: int) -> list[list[int]]:
    """Indices of pairs sharing one forward: similar lengths together, rows x longest <= forward_tokens."""
    order = sorted(range(len(pairs)), key=lambda i: _packed_len(pairs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * _packed_len(pairs[i]) <= forward_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _packed_len(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def _token_logps(base, hidden_or_logits: torch.Tensor, targets: torch.Tensor, plain: bool):
    """Per-token log-probs of `targets` and the mean logit of each position."""
    logits = (base.get_output_embeddings()(hidden_or_logits) if plain else hidden_or_logits).float()
    lp = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return lp, logits.detach().mean(-1)


def _packed_forward(model, base, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int):
    """One forward over rows `prompt + chosen + rejected` (right-padded to the longest row)."""
    width = max(_packed_len(p) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(pairs), width), dtype=torch.long)
    allowed = torch.ones((width, width), dtype=torch.bool).tril().repeat(len(pairs), 1, 1)
    for i, p in enumerate(pairs):
        n_p, n_c, n = len(p.prompt_ids), len(p.chosen_ids), _packed_len(p)
        ids[i, :n] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids, dtype=torch.long)
        pos[i, :n] = torch.cat([torch.arange(n_p + n_c), torch.arange(n_p, n - n_c)])
        allowed[i, n_p + n_c :, n_p : n_p + n_c] = False  # rejected never sees chosen
        allowed[i, :, n:] = False  # nobody sees padding ...
        allowed[i, n:, n:] |= torch.eye(width - n, dtype=torch.bool)  # ... padding sees itself: no empty row, no NaN
    mask = _attention_mask(base, allowed[:, None].to(device))
    ids, pos = ids.to(device), pos.to(device)
    plain = _plain_head(base.config)
    if plain:
        out = base.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    else:  # the model post-processes its logits (scaling, soft-capping): let it, on every position
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    results = []
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        # chosen token j is predicted at n_p - 1 + j; rejected token 0 at n_p - 1 (the prompt's end), token j at
        # n_p + n_c + j - 1
        at_c = torch.arange(n_p - 1, n_p + n_c - 1, device=device)
        at_r = torch.cat([torch.tensor([n_p - 1], device=device),
                          torch.arange(n_p + n_c, n_p + n_c + n_r - 1, device=device)])
        targets = ids[i, n_p : n_p + n_c + n_r]
        lp_c, ml_c = _token_logps(base, out[i, at_c], targets[:n_c], plain)
        lp_r, ml_r = _token_logps(base, out[i, at_r], targets[n_c:], plain)
        results.append((lp_c, lp_r, ml_c, ml_r))
    return results


def _attention_mask(base, allowed: torch.Tensor) -> torch.Tensor:
    """sdpa takes a boolean mask; eager attention adds the mask to its scores."""
    if getattr(base.config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(base.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def _padded_forward(model, base, rows: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device,
                    pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row `(prompt, completion)`: per-token log-probs and mean logits of the completion (right padding)."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)  # positions whose NEXT token is a completion token
    for i, (prompt, completion) in enumerate(rows):
        seq = list(prompt) + list(completion)
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        scored[i, len(prompt) - 1 : len(seq) - 1] = True
    input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
    row_of, pos = scored.nonzero(as_tuple=True)
    plain = _plain_head(base.config)
    if plain:
        out = base.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    else:
        out = model(input_ids=input_ids, attention_mask=attention).logits
    lp, ml = _token_logps(base, out[row_of, pos], input_ids[row_of, pos + 1], plain)
    counts = [len(c) for _, c in rows]
    return list(zip(lp.split(counts), ml.split(counts)))


def sequence_logps(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device,
                   pad_id: int) -> torch.Tensor:
    """Summed log-probs of each `(prompt_ids, completion_ids)` row's completion, padded rows; shape [rows]."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return torch.stack([lp.sum() for lp, _ in _padded_forward(model, base, rows, device, pad_id)])

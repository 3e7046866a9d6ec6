"""Summed completion log-probabilities of chosen and rejected, in one batched forward.

logp(completion | prompt) = sum over completion tokens t of log p(y_t | x, y_<t),
at temperature 1; the prompt is never scored, a trailing EOS is. Rows are
right-padded with an attention mask, so padding never changes a real token's
logits (causal attention: real tokens only see earlier real tokens).

Only the scored positions go through the LM head, and each log-prob is taken
as `z_target - logsumexp(z)`: the form TRL's chunked head uses, which matches
it to ~3e-5 on summed logps where `log_softmax(...).gather(...)` drifts up to
2e-3 (notes/trl-dpo.md). Skipping the prompt positions also skips most of the
vocabulary-sized work, which dominates a 135M model's forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.tokenize import TokenizedPair


def sequence_logps(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device,
                   pad_id: int) -> torch.Tensor:
    """Summed log-probs of each `(prompt_ids, completion_ids)` row's completion under `model`; shape [rows].

    `model` is a (PEFT-wrapped) causal LM; gradients flow when the caller allows them.
    """
    lengths = [len(p) + len(c) for p, c in rows]
    width = max(lengths)
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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _plain_head(base.config):
        hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        logits = base.get_output_embeddings()(hidden[row_of, pos]).float()  # [scored tokens, vocab]
    else:  # the model post-processes its logits (scaling, soft-capping): let it, on every position
        logits = model(input_ids=input_ids, attention_mask=attention).logits[row_of, pos].float()
    targets = input_ids[row_of, pos + 1]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(len(rows), dtype=token_logps.dtype, device=device).index_add(0, row_of, token_logps)


def _plain_head(config) -> bool:
    """True when the logits are exactly `lm_head(last hidden state)`, as for Llama/SmolLM2."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def pair_logps(model, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int) -> torch.Tensor:
    """[pairs, 2] summed log-probs (column 0 chosen, 1 rejected), both sides in one forward."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    out = sequence_logps(model, rows, device, pad_id)
    return torch.stack([out[: len(pairs)], out[len(pairs):]], dim=1)


@torch.no_grad()
def reference_logps(model, pairs: Sequence[TokenizedPair], device: torch.device, pad_id: int,
                    batch_pairs: int) -> torch.Tensor:
    """[pairs, 2] log-probs under the reference: the same model with its adapter disabled.

    The reference never changes, so a window computes this once and reuses it for every step.
    """
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            parts = [pair_logps(model, pairs[i : i + batch_pairs], device, pad_id)
                     for i in range(0, len(pairs), batch_pairs)]
    finally:
        model.train(was_training)
    return torch.cat(parts, dim=0)

"""The reference model's log-likelihood of an answer: a fluency signal no rule can satisfy.

`ReferenceScorer` loads the base model (HF transformers, float32) once and
returns, for each answer to a prompt, the mean log-probability per token of
the answer's tokens after the chat-formatted prompt (the way vLLM's chat
endpoint formats it). Word salad, a looping phrase or a bare "world." score
low; a fluent on-topic sentence scores near the base model's own answers
(about -0.8 per token greedy, -1.5 sampled at temperature 1, for SmolLM2-135M).
Averaged over a policy's answers it is also a cheap estimate of how far the
policy has moved from the reference (the KL the DPO objective pays for).

It scores an answer's `surface_form`: the surface its prompt's constraints ask
for (lowercase, no commas, bullets, headers, ...; judge/surface.py) normalised away, the same way for every
answer to that prompt. The base model's log-prob per token falls 0.39 when its
own answer to a lowercase prompt is lowercased, 0.36 when the commas of one to
a "no commas" prompt are removed: scored raw, the fluency term and the gate's
drift limit would punish obeying the prompt. Normalised, an answer that obeys
and one that does not are scored on the same words, so what the signal still
sees is harm (word salad, loops, a bare "no"), not obedience.

torch is imported when a scorer is made, not with this module.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from judge.base import chat_messages
from judge.surface import surface_form  # what the scorer scores (also imported from here)


class ReferenceScorer:
    def __init__(self, model_dir: Path, threads: int = 1, device: str = "cpu", batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "cpu":
            torch.set_num_threads(threads)
        self._torch, self.device, self.batch_size = torch, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        self._lock = threading.Lock()  # one forward at a time (the gate and a request may share a scorer)

    def prompt_ids(self, prompt: Any) -> list[int]:
        ids = self.tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def logprob_per_token(self, prompt: Any, texts: Sequence[str]) -> list[float]:
        """Mean log-probability per token of each text's `surface_form` after the chat-formatted prompt."""
        task = getattr(prompt, "task", None)
        texts = [surface_form(task, t) for t in texts]
        head = self.prompt_ids(prompt)
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            out.extend(self._batch(head, texts[start:start + self.batch_size]))
        return out

    def _batch(self, head: list[int], texts: Sequence[str]) -> list[float]:
        torch = self._torch
        bodies = [self.tokenizer(t, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
                  for t in texts]
        rows = [head + b for b in bodies]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out = []
        for i, body in enumerate(bodies):
            first = len(head) - 1  # the logit at position t predicts token t + 1
            out.append(float(logp[i, first:first + len(body)].mean()))
        return out


class CachedScorer:
    """A scorer that remembers each (prompt, answer)'s number: an evaluation scores every answer once for its
    signals and again, in both orders, for the win rate."""

    def __init__(self, scorer, max_entries: int = 100_000):
        self.scorer, self.max_entries = scorer, max_entries
        self._cache: dict[tuple[str, str], float] = {}

    def logprob_per_token(self, prompt: Any, texts: Sequence[str]) -> list[float]:
        key = getattr(prompt, "id", None) or str(prompt)
        todo = [t for t in dict.fromkeys(texts) if (key, t) not in self._cache]
        if todo:
            if len(self._cache) + len(todo) > self.max_entries:
                self._cache.clear()
            self._cache.update({(key, t): lp for t, lp in zip(todo, self.scorer.logprob_per_token(prompt, todo))})
        return [self._cache[(key, t)] for t in texts]

"""The `reward_model` plugin: a local HF sequence-classification model with one output scores each response.

Any `AutoModelForSequenceClassification` folder with `num_labels == 1` works
(nothing is downloaded: the path must be a local folder). Each response is
rendered as the conversation the reward model was trained on: the prompt's
messages (a text prompt as one user turn) plus the response as the assistant
turn, through the tokenizer's chat template when it has one. Responses are
scored in length-sorted batches (less padding), on CUDA when asked for or
present, and truncated from the left so the response's end is always seen.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from judge.base import Judgement, chat_messages
from core.contracts import PromptEvent

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModelJudge:
    name = "reward_model"

    def __init__(self, path: Path | str, device: Literal["auto", "cpu", "cuda"] = "auto", batch_size: int = 16,
                 max_length: int = 1024, threads: int = 1, dtype: str = "float32"):
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"reward model {path} is not a local HF model folder (no config.json)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_DTYPES[dtype]).to(self.device)
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} outputs; a reward model has 1")
        if self.model.config.pad_token_id is None:  # batches need it to find each row's last real token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        log.info("reward model %s on %s, batches of %d", path, self.device, batch_size)

    def render(self, prompt: PromptEvent, response: str) -> str:
        """The text the reward model reads for one response."""
        turns = chat_messages(prompt)
        turns.append({"role": "assistant", "content": response})
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        return "\n\n".join(t["content"] for t in turns)

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Reward of each rendered text, in order."""
        special = not self.tokenizer.chat_template  # a chat template writes its own special tokens
        encoded = [self.tokenizer(t, add_special_tokens=special, truncation=True,
                                  max_length=self.max_length)["input_ids"] for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device)).logits
            for i, v in zip(idx, logits[:, 0].float().cpu().tolist()):
                out[i] = v
        return out

    def judge(self, prompt: PromptEvent, responses: Sequence[str]) -> Judgement:
        return Judgement(self.score_texts([self.render(prompt, r) for r in responses]))

"""The policy: the float32 base model with a trainable LoRA adapter, and its tokenizer.

One model serves as both policy and reference: the reference is the same
model with the adapter disabled (`model.disable_adapter()`), so only the LoRA
weights and their optimizer state take extra memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from core.assets import base_model_name
from core.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A LoRA-wrapped causal LM on its device, with the tokenizer and the base model's name."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    base_model: str

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.model.get_base_model().get_output_embeddings().weight.shape[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where it pays and is supported (a GPU), else float32; the weights stay float32.

    `auto` keeps the CPU in float32: the served model runs float32 and the numbers must match it
    and TRL's; bf16 on these CPUs (AVX2, no AVX-512 BF16) is slower anyway.
    """
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def lora_config(settings: TrainerSettings) -> LoraConfig:
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def load_policy(model_dir: Path, settings: TrainerSettings, adapter_dir: Path | None = None,
                device: torch.device | None = None) -> Policy:
    """Base model (float32) + a fresh LoRA from `settings`, or the trainable LoRA saved in `adapter_dir`.

    A fresh LoRA starts with `lora_B = 0`, so version 0 of the policy equals the base model.
    """
    torch.set_num_threads(settings.threads)
    device = device or pick_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32 everywhere: the server runs float32 too and its logprobs then match ours to ~1e-5.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base.config.use_cache = False  # training forwards never reuse a KV cache
    if adapter_dir is None:
        torch.manual_seed(settings.seed)  # reproducible lora_A init
        model = get_peft_model(base, lora_config(settings))
    else:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        log.info("resumed LoRA weights from %s", adapter_dir)
    model.to(device)
    return Policy(model=model, tokenizer=tokenizer, device=device, base_model=base_model_name(Path(model_dir)))

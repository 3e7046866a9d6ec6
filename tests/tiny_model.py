"""A tiny Llama with the SmolLM2 tokenizer, built locally: the real code paths in milliseconds per forward.

Same tokenizer, chat template and vocabulary as the packaged model, so pairs
tokenize identically; 2 layers of width 64 instead of 30 of 576. Weights are
seeded and scaled up (std 0.2) so the next-token distributions are far from
uniform and log-probs differ visibly between pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def build_tiny_llama(target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return Path(target)

"""Generation throughput: vLLM vs HF transformers `generate`, same prompts, same token count, greedy.

Both sides decode the same bundled chat prompts to exactly `--max-tokens` new
tokens each (vLLM with `ignore_eos`, HF with `min_new_tokens`), greedy, fp32:
vLLM gets all prompts at once as concurrent requests (continuous batching), HF
one left-padded batch. Rows: the base model, and a LoRA policy version (vLLM's
runtime-loaded adapter vs HF+peft). HF runs with `--hf-threads` torch threads
(default 1, the one compute core vLLM binds on a 2-core box); vLLM is stopped
while HF runs so they never compete.

    flock /tmp/odpo-vllm.lock python -m benchmarks.generation [--prompts 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import chat_prompt_ids, model_dir, peft_model, quiet_logs, write_adapters, write_json
from generator.server import VllmServer
from core.settings import GeneratorSettings


def vllm_run(client: httpx.Client, model: str, prompts: list[list[int]], max_tokens: int):
    """All prompts as concurrent greedy requests; returns (new tokens, seconds, token ids per prompt)."""
    def one(ids):
        resp = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": max_tokens,
                                                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
        resp.raise_for_status()
        return resp.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        outs = list(pool.map(one, prompts))
        elapsed = time.perf_counter() - t0
    return sum(map(len, outs)), elapsed, outs


def hf_run(model, tokenizer, prompts: list[list[int]], max_tokens: int):
    """One left-padded batch through `generate`; returns (new tokens, seconds, token ids per prompt)."""
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        elapsed = time.perf_counter() - t0
    new = out[:, width:]
    return new.numel(), elapsed, new.tolist()


def agreeing_prefix(a: list[list[int]], b: list[list[int]], upto: int) -> int:
    """How many prompts give the same first `upto` tokens on both sides (greedy fp32 should mostly agree)."""
    return sum(x[:upto] == y[:upto] for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts decoded at once")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt, on both sides")
    ap.add_argument("--hf-threads", type=int, default=1, help="torch threads for HF generate")
    ap.add_argument("--no-lora", action="store_true", help="skip the LoRA row")
    ap.add_argument("--out", "--json", dest="out", type=Path, default=None,
                    help="also write the results here as JSON (--json: its old name)")
    args = ap.parse_args()
    quiet_logs()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.hf_threads)
    base = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = chat_prompt_ids(tokenizer, args.prompts)
    rows = [("base", None)] + ([] if args.no_lora else [("LoRA r=8", "policy-v1")])
    with tempfile.TemporaryDirectory(prefix="odpo-generation-") as tmp:
        work = Path(tmp)
        model = peft_model(base)
        readies = [] if args.no_lora else write_adapters(model, base, work, [1])
        vllm = {}
        print(f"vLLM: {args.prompts} concurrent requests x {args.max_tokens} tokens, greedy")
        server = VllmServer(base, GeneratorSettings(vllm_port=0), log_file=work / "vllm.log")
        with server, httpx.Client(base_url=server.url, timeout=900) as client:
            for ready in readies:
                client.post("/v1/load_lora_adapter", json={"lora_name": "policy-v1",
                                                           "lora_path": str(work / ready.path)}).raise_for_status()
            for label, name in rows:
                served = name or str(base)
                vllm_run(client, served, prompts[:2], 4)  # warm-up
                vllm[label] = vllm_run(client, served, prompts, args.max_tokens)
                print(f"  {label}: {vllm[label][0] / vllm[label][1]:.1f} tokens/s")
        print(f"HF generate: one batch of {args.prompts} x {args.max_tokens} tokens, greedy, "
              f"{args.hf_threads} thread(s)")
        hf = {}
        for label, name in rows:
            if name is None:
                with model.disable_adapter():
                    hf_run(model, tokenizer, prompts[:2], 4)
                    hf[label] = hf_run(model, tokenizer, prompts, args.max_tokens)
            else:
                hf_run(model, tokenizer, prompts[:2], 4)
                hf[label] = hf_run(model, tokenizer, prompts, args.max_tokens)
            print(f"  {label}: {hf[label][0] / hf[label][1]:.1f} tokens/s")

    result = {"prompts": args.prompts, "max_tokens": args.max_tokens, "hf_threads": args.hf_threads, "rows": {}}
    print(f"\n{'model':<10} {'vLLM tok/s':>11} {'HF tok/s':>9} {'vLLM/HF':>8}  same first 8 tokens")
    for label, _ in rows:
        (vt, vs, vout), (ht, hs, hout) = vllm[label], hf[label]
        same = agreeing_prefix(vout, hout, 8)
        result["rows"][label] = {"vllm_tokens_per_s": vt / vs, "hf_tokens_per_s": ht / hs,
                                 "ratio": (vt / vs) / (ht / hs), "same_first_8_tokens": f"{same}/{len(prompts)}"}
        print(f"{label:<10} {vt / vs:>11.1f} {ht / hs:>9.1f} {(vt / vs) / (ht / hs):>7.2f}x  {same}/{len(prompts)}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

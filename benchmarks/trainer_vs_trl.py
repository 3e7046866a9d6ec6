"""odpo's DPO trainer against TRL 1.16's DPOTrainer: same model, LoRA, pairs, hyper-parameters, in one run.

    python benchmarks/trainer_vs_trl.py [--pairs 32] [--step-pairs 4] [--threads 1]

Both train SmolLM2-135M-Instruct (float32, CPU) with a LoRA of r=8 on
q/k/v/o starting from the same weights, over the same pairs in the same order
(TRL's sequential sampler), `step-pairs` pairs per AdamW step, one pass,
constant learning rate, beta 0.1, gradient clip 1.0, no gradient
checkpointing. Pairs: the bundled task's train prompts (chat), two completions
each sampled from the model itself (temperature 1, up to 128 new tokens,
seeded; cached under ~/.cache/odpo/bench). Timed: the training call only
(TRL's `train()`, odpo's `train_window`), reference log-probs included on
both sides; model loading and tokenization are not.

Prints pairs/s of both, the ratio, and the largest absolute difference of
the per-step losses (TRL's `compute_loss` return values, not its rounded log).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sample_pairs(model_dir: Path, n: int, seed: int, max_new_tokens: int = 128) -> list[dict]:
    """n conversational pairs: a bundled train prompt and two of the model's own sampled answers."""
    cache = Path("~/.cache/odpo/bench").expanduser() / f"trainer_vs_trl-{n}-{seed}-{max_new_tokens}.jsonl"
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.task import make_prompts

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [[m.model_dump() for m in p.messages] for p in make_prompts("train", n, seed=seed)]
    texts = []
    torch.manual_seed(seed)
    for i in range(0, n, 8):
        chunk = [tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                 for msgs in prompts[i : i + 8] for _ in range(2)]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  sampled {len(texts)}/{2 * n} completions", file=sys.stderr)
    pairs = [{"prompt": prompts[i], "chosen": [{"role": "assistant", "content": texts[2 * i].strip() or "ok"}],
              "rejected": [{"role": "assistant", "content": texts[2 * i + 1].strip() or "no"}]} for i in range(n)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def run_odpo(model_dir: Path, records: list[dict], args) -> tuple[float, list[float], dict]:
    from core.settings import TrainerSettings
    from trainer.model import load_policy
    from trainer.pairs_file import pair_from_record
    from trainer.recipe import Trainer

    settings = TrainerSettings(beta=args.beta, learning_rate=args.lr, window_pairs=len(records),
                               step_pairs=args.step_pairs, batch_pairs=args.step_pairs,
                               steps_per_window=-(-len(records) // args.step_pairs), max_length=args.max_length,
                               threads=args.threads)
    trainer = Trainer(load_policy(model_dir, settings), settings)
    initial = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_" in n}
    pairs = [trainer.tokenize(pair_from_record(r)) for r in records]
    t0 = time.perf_counter()
    result = trainer.train_window(pairs)
    seconds = time.perf_counter() - t0
    assert result.steps == settings.steps_per_window and result.publishable, result
    return seconds, result.step_losses, initial


def run_trl(model_dir: Path, records: list[dict], initial: dict, args) -> tuple[float, list[float]]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from core.settings import TrainerSettings
    from trainer.model import lora_config

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="odpo-bench-trl-"), report_to="none", use_cpu=True,
                       bf16=False, gradient_checkpointing=False, per_device_train_batch_size=args.step_pairs,
                       gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=args.lr,
                       lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
                       max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
                       train_sampling_strategy="sequential", save_strategy="no", logging_steps=1,
                       disable_tqdm=True, seed=0, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(model_dir),
                         peft_config=lora_config(TrainerSettings()))
    with torch.no_grad():  # start from odpo's initial LoRA weights
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(initial[name])
    trainer.remove_callback(PrinterCallback)  # its per-step dicts would bury the comparison
    losses: list[float] = []
    compute_loss = trainer.compute_loss

    def recorded(*a, **kw):  # TRL's own loss, unrounded (its log rounds to 4 decimals)
        loss = compute_loss(*a, **kw)
        losses.append(loss.item())
        return loss

    trainer.compute_loss = recorded
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=32, help="Pairs trained by each side (one pass).")
    ap.add_argument("--step-pairs", type=int, default=4, help="Pairs per optimizer step (TRL's batch size).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides.")
    ap.add_argument("--lr", type=float, default=5e-4, help="Learning rate (constant) of both.")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="Prompt set and sampling seed.")
    ap.add_argument("--out", type=Path, default=None, help="Also write the results here as JSON.")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from core.assets import base_model_dir

    torch.set_num_threads(args.threads)
    model_dir = base_model_dir(Path("~/.cache/odpo").expanduser())
    records = sample_pairs(model_dir, args.pairs, args.seed)
    lengths = _lengths(model_dir, records)
    print(f"{len(records)} pairs; tokens per pair (prompt + chosen + rejected): min {min(lengths)}, "
          f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; {args.step_pairs} pairs per step; "
          f"{args.threads} thread(s) each; torch {torch.__version__}")
    odpo_s, odpo_losses, initial = run_odpo(model_dir, records, args)
    print(f"odpo: {odpo_s:.1f} s")
    trl_s, trl_losses = run_trl(model_dir, records, initial, args)
    print(f"TRL : {trl_s:.1f} s")
    n = len(records)
    diffs = [abs(a - b) for a, b in zip(odpo_losses, trl_losses)]
    print("\nstep  loss odpo     loss TRL      |diff|")
    for i, (a, b) in enumerate(zip(odpo_losses, trl_losses)):
        print(f"{i + 1:4d}  {a:.7f}   {b:.7f}   {abs(a - b):.2e}")
    print(f"\nodpo {n / odpo_s:.3f} pairs/s, TRL {n / trl_s:.3f} pairs/s, ratio {trl_s / odpo_s:.2f}x; "
          f"max |loss diff| over {len(diffs)} steps: {max(diffs):.2e}")
    from benchmarks.common import write_json

    write_json(args.out, {"pairs": n, "odpo_s": odpo_s, "trl_s": trl_s, "ratio_trl_over_odpo": trl_s / odpo_s,
                          "odpo_losses": odpo_losses, "trl_losses": trl_losses, "max_abs_loss_diff": max(diffs)})
    if len(odpo_losses) != len(trl_losses):
        print(f"step counts differ: odpo {len(odpo_losses)}, TRL {len(trl_losses)}")
        return 1
    return 0


def _lengths(model_dir: Path, records: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    from trainer.pairs_file import pair_from_record
    from trainer.tokenize import tokenize_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = [tokenize_pair(pair_from_record(r), tok, 512) for r in records]
    return [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]


if __name__ == "__main__":
    sys.exit(main())

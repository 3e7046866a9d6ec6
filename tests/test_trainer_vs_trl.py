"""odpo's tokenization, log-probs, losses and logged metrics against TRL 1.16's DPOTrainer running its own code.

Both sides hold the same tiny Llama (SmolLM2 tokenizer) with the same non-zero
LoRA weights. TRL's numbers come from its own code path: its dataset
preparation (tokens), `DataCollatorForPreference`, the fused-LM-head forward
(`fused_lm_head=True`) for per-pair policy log-probs, `compute_ref_log_probs`
(adapter disabled) and `compute_loss` for losses and the metrics it logs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.settings import TrainerSettings
from trainer.losses import LOSSES, reward_metrics
from trainer.model import load_policy, lora_config
from trainer.pairs_file import pair_from_record
from trainer.recipe import Trainer
from trainer.tokenize import tokenize_pair

trl = pytest.importorskip("trl", minversion="1.16.0")
datasets = pytest.importorskip("datasets")

TOL = 1e-4
# Summed float32 log-probs of ~-200 nats round at ~1.5e-5 (one ulp), on TRL's side as on ours, and a pair's
# log-ratios add up to four such sums (policy and reference, chosen and rejected); squared losses (sppo_hard,
# ipo) multiply a log-ratio's error by 2|x - 1/(2 beta)| (~5 at a loss of ~6), so a loss may differ by ~3e-4
# in ~6: a relative 5e-5 (one CI machine measured 2.6e-5 on sppo_hard). A wrong formula is off by far more.
LOSS_REL = 5e-5
CHAT = [
    ("Name a colour.", "Blue.", "I cannot answer that, sorry, it is far too hard for me."),
    ("Say hi in five words.", "Hi there, how are you?", "No."),
    ("What is 2+2? Answer briefly and explain nothing at all.", "4", "It is five, or maybe six; hard to say."),
    ("Write one line about the sea.", "The sea is wide and blue.", "Sea."),
    ("List two fruits.", "- apple\n- pear", "Fruits are things that grow on trees, like apples."),
]
TEXT = [  # plain text: EOS appended; prompts ending in a space or newline merge across the boundary
    ("Question: what is the capital of France?\nAnswer: ", "Paris", "London"),
    ("Translate to French: cat =", " chat", " chien<|im_end|>"),
    ("The sky is\n\n", "blue.", "green, or maybe purple at noon."),
]
PARAMS = {  # label smoothing where the loss reads it; exo_pair needs > 0
    "robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}, "aot": {"label_smoothing": 0.1},
}


def chat_records():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in CHAT]


def text_records():
    return [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in TEXT]


def trl_trainer(model_dir, records, tmp_path, loss_type=("sigmoid",), loss_weights=None, **config):
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(records), report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=256, save_strategy="no",
                         loss_type=list(loss_type), loss_weights=loss_weights, **config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                          processing_class=AutoTokenizer.from_pretrained(model_dir),
                          peft_config=lora_config(TrainerSettings()))


@pytest.fixture(scope="module")
def ours(tiny_model_dir):
    """odpo's policy with random non-zero LoRA weights (A and B), so policy and reference differ."""
    policy = load_policy(tiny_model_dir, TrainerSettings())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return policy


def copy_lora(src_model, dst_model) -> None:
    src = {n: p for n, p in src_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in dst_model.named_parameters():
            if "lora_" in n:
                p.copy_(src[n])


def trl_numbers(tr, batch_rows):
    """TRL's per-pair policy and reference log-probs of a collated batch, from its own forward paths."""
    batch = tr.data_collator(batch_rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                       fused_lm_head=True, use_cache=False)
        ref_c, ref_r = tr.compute_ref_log_probs(tr.model, batch)
    pol_c, pol_r = out.log_probs.sum(1).chunk(2)
    return batch, torch.stack([pol_c, pol_r], 1), torch.stack([ref_c, ref_r], 1)


def rows_of(tr):
    return [{k: tr.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for i in range(len(tr.train_dataset))]


@pytest.mark.parametrize("records", [chat_records, text_records], ids=["chat", "text"])
def test_tokenization_equals_trl(tiny_model_dir, tmp_path, records, ours):
    tr = trl_trainer(tiny_model_dir, records(), tmp_path)
    for rec, row in zip(records(), rows_of(tr)):
        tp = tokenize_pair(pair_from_record(rec), ours.tokenizer, max_length=256)
        assert (list(tp.prompt_ids), list(tp.chosen_ids), list(tp.rejected_ids)) == \
            (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])


@pytest.mark.parametrize("loss_type", sorted(LOSSES) + ["rpo"])
def test_logps_losses_and_metrics_equal_trl(tiny_model_dir, tmp_path, ours, loss_type):
    extra = PARAMS.get(loss_type, {})
    if loss_type == "rpo":  # TRL 1.16 spells RPO as an added "sft" loss with its weight
        tr = trl_trainer(tiny_model_dir, chat_records(), tmp_path, ("sigmoid", "sft"), [1.0, 0.5], beta=0.2)
        settings = TrainerSettings(loss_type="sigmoid", beta=0.2, rpo_alpha=0.5, max_length=256)
    else:
        tr = trl_trainer(tiny_model_dir, chat_records(), tmp_path, (loss_type,), beta=0.2, **extra)
        settings = TrainerSettings(loss_type=loss_type, beta=0.2, max_length=256, **extra)
    copy_lora(ours.model, tr.model)
    trainer = Trainer(ours, settings)
    pairs = [trainer.tokenize(pair_from_record(r)) for r in chat_records()]

    batch, trl_pol, trl_ref = trl_numbers(tr, rows_of(tr))
    ref = trainer.reference(pairs)
    with torch.no_grad():
        out, scored = trainer.forward(pairs, ref)
    assert (scored.logps - trl_pol).abs().max().item() < TOL
    assert (torch.stack([ref[p.pair_id] for p in pairs]) - trl_ref).abs().max().item() < TOL
    assert (trl_pol - trl_ref).abs().max().item() > 0.1  # the adapter matters: a real comparison

    tr.model.train()  # TRL logs under "train" in train mode; dropout is 0, so numbers are the same
    with torch.no_grad():
        trl_loss = tr.compute_loss(tr.model, batch).item()
    ours_loss = out.objective(len(pairs), sum(len(p.chosen_ids) for p in pairs), settings.rpo_alpha).item()
    assert ours_loss == pytest.approx(trl_loss, abs=TOL, rel=LOSS_REL)
    logged = {k: v[-1] for k, v in tr._metrics["train"].items()}
    mine = reward_metrics(out)
    for trl_key, key in (("rewards/chosen", "reward_chosen"), ("rewards/rejected", "reward_rejected"),
                         ("rewards/margins", "reward_margin"), ("rewards/accuracies", "reward_accuracy")):
        assert mine[key] == pytest.approx(logged[trl_key], abs=TOL), trl_key
    logps_mean = scored.logps.mean(0)
    logits_mean = scored.mean_logit_sums.sum(0) / scored.lengths.sum(0)
    for i, side in enumerate(("chosen", "rejected")):
        assert logps_mean[i].item() == pytest.approx(logged[f"logps/{side}"], abs=TOL)
        assert logits_mean[i].item() == pytest.approx(logged[f"logits/{side}"], abs=TOL)

    if loss_type not in ("aot", "rpo"):  # per pair: TRL on one-pair batches (aot and the SFT term are batch-level)
        for i, row in enumerate(rows_of(tr)):
            with torch.no_grad():
                single = tr.compute_loss(tr.model, tr.data_collator([row])).item()
            assert out.losses[i].item() == pytest.approx(single, abs=TOL, rel=LOSS_REL), i


def test_gradient_equals_trl(tiny_model_dir, tmp_path, ours):
    """One step's LoRA gradient: odpo's packed micro-batches (2 + 2 + 1 pairs) against TRL's one padded batch."""
    tr = trl_trainer(tiny_model_dir, chat_records(), tmp_path, ("sigmoid",), beta=0.2)
    copy_lora(ours.model, tr.model)
    trainer = Trainer(ours, TrainerSettings(beta=0.2, batch_pairs=2, max_length=256))
    pairs = [trainer.tokenize(pair_from_record(r)) for r in chat_records()]
    ref = trainer.reference(pairs)
    ours.model.zero_grad(set_to_none=True)
    loss, _ = trainer._accumulate(pairs, ref)
    tr.model.train()
    tr.model.zero_grad(set_to_none=True)
    trl_loss = tr.compute_loss(tr.model, tr.data_collator(rows_of(tr)))
    trl_loss.backward()
    assert loss == pytest.approx(trl_loss.item(), abs=TOL)
    theirs = {n: p.grad for n, p in tr.model.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in ours.model.named_parameters() if p.grad is not None}
    assert set(mine) == set(theirs) and len(mine) > 0
    scale = max(g.abs().max().item() for g in theirs.values())
    assert max((mine[n] - theirs[n]).abs().max().item() for n in mine) < 1e-4 * max(scale, 1.0)
    ours.model.zero_grad(set_to_none=True)

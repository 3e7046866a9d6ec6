"""`odpo adapters export`: versions the real trainer made, exported merged (transformers loads it, and its logits and
greedy answer are the base+adapter's, not the base's) and as a peft folder with a model card; a tampered adapter,
an unknown or unannounced version, a wrong base model and a busy output folder are one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.adapter_store import adapter_digest, write_manifest
from core.contracts import AdapterReady, TrainMetrics
from service.cli import main
from tests.test_trainer_offline import QA, chat, write
from trainer.checkpoint import STATE_FILE

PROMPT = [{"role": "user", "content": "Name a colour."}]


def announce(store, version):
    """Record a version as `odpo trainer` does after publishing it (its AdapterReady in announced/)."""
    folder = store / f"policy-v{version}"
    state = json.loads((folder / STATE_FILE).read_text())
    m = state["metrics"]
    write_manifest(store, AdapterReady(
        version=version, path=folder.name, sha256=adapter_digest(folder), base_model=state["base_model"],
        parent_version=state["parent_version"], pairs_trained=len(state["trained_ids"]),
        metrics=TrainMetrics(loss=m["loss"], reward_margin=m["reward_margin"],
                             reward_accuracy=m["reward_accuracy"], steps=int(m["steps"]), beta=m["beta"])))


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    """Two versions written by the real trainer (`odpo train`, a learning rate that moves the tiny model), both
    announced; version 3 is written but not announced."""
    root = tmp_path_factory.mktemp("export")
    pairs = write(root / "pairs.jsonl", [chat(*qa) for qa in QA[:4]])
    mp = pytest.MonkeyPatch()
    mp.setenv("ODPO_TRAINER_LEARNING_RATE", "0.02")
    try:
        assert main(["train", "--base-model", str(tiny_model_dir), "--pairs", str(pairs), "--store",
                     str(root / "store"), "--window-pairs", "2", "--steps-per-window", "4"]) == 0
        write(pairs, [chat(*qa) for qa in QA])
        assert main(["train", "--base-model", str(tiny_model_dir), "--pairs", str(pairs), "--store",
                     str(root / "store"), "--window-pairs", "2"]) == 0
    finally:
        mp.undo()
    store = root / "store"
    for v in (1, 2):
        announce(store, v)
    return store


def export(capsys, *argv):
    code = main(["adapters", "export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def logits_and_greedy(model, tok):
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    return logits, greedy


def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_merged_export_loads_in_transformers_and_answers_as_base_plus_adapter(store, tiny_model_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "merged"
    code, stdout, err = export(capsys, "--merged", out, "--store", store, "--base-model", tiny_model_dir)
    assert code == 0, err
    assert "policy-v2 (the newest announced version)" in stdout  # no gate registry: the newest announced one
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert "# policy-v2" in (out / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    got_logits, got_greedy = logits_and_greedy(merged, tok)
    peft_logits, peft_greedy = logits_and_greedy(PeftModel.from_pretrained(base_model(tiny_model_dir),
                                                                            store / "policy-v2"), tok)
    base_logits, _ = logits_and_greedy(base_model(tiny_model_dir), tok)
    assert torch.allclose(got_logits, peft_logits, atol=1e-4), (got_logits - peft_logits).abs().max()
    assert got_greedy == peft_greedy
    assert (got_logits - base_logits).abs().max() > 0.05  # the adapter is in there: not the base model


def test_peft_export_of_the_promoted_version_with_its_model_card(store, tiny_model_dir, tmp_path, capsys):
    registry = {"format": 1, "evaluation": {}, "promoted": 1, "history": [0, 1], "pinned": False,
                "records": [{"version": 0, "status": "passed", "score": 0.5, "rows": [{}] * 4},
                            {"version": 1, "status": "promoted", "score": 0.625, "rows": [{}] * 4},
                            {"version": 2, "status": "refused", "score": 0.25, "rows": [{}] * 4}]}
    (store / "gate-registry.json").write_text(json.dumps(registry))
    try:
        out = tmp_path / "peft"
        code, stdout, err = export(capsys, "--peft", out, "--store", store)
        assert code == 0, err
        assert "policy-v1 (the version the gate promoted)" in stdout
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                         "adapter_model.safetensors"]
        assert (out / "adapter_model.safetensors").read_bytes() == \
            (store / "policy-v1" / "adapter_model.safetensors").read_bytes()
        card = (out / "README.md").read_text()
        manifest = json.loads((store / "announced" / "policy-v1.json").read_text())
        assert "# policy-v1" in card and "| pairs trained | 2 |" in card and manifest["sha256"] in card
        assert f"base_model: {json.dumps(str(tiny_model_dir))}" in card and "library_name: peft" in card
        assert "| held-out score (promotion gate) | 0.6250 on 4 prompts, promoted |" in card
        assert "| learning_rate | 0.02 |" in card and "| steps_per_window | 4 |" in card

        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        loaded, _ = logits_and_greedy(PeftModel.from_pretrained(base_model(tiny_model_dir), out), tok)
        stored, _ = logits_and_greedy(PeftModel.from_pretrained(base_model(tiny_model_dir), store / "policy-v1"), tok)
        base, _ = logits_and_greedy(base_model(tiny_model_dir), tok)
        assert torch.equal(loaded, stored) and (loaded - base).abs().max() > 0.05

        code, stdout, err = export(capsys, "--peft", tmp_path / "v2", "--store", store, "--version", 2)
        assert code == 0 and "policy-v2 (as asked)" in stdout
        assert "| held-out score (promotion gate) | 0.2500 on 4 prompts, refused |" in (tmp_path / "v2" /
                                                                                        "README.md").read_text()
    finally:
        (store / "gate-registry.json").unlink()


def one_line_refusal(code, out, err, needle):
    assert code == 2 and out == "" and err.startswith("odpo: error: ") and err.count("\n") == 1, (code, out, err)
    assert needle in err, err


def test_a_tampered_adapter_is_refused(store, tiny_model_dir, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    weights = copy / "policy-v2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one LoRA weight
    weights.write_bytes(bytes(data))
    for flag in ("--peft", "--merged"):
        out = tmp_path / flag.strip("-")
        one_line_refusal(*export(capsys, flag, out, "--store", copy, "--base-model", tiny_model_dir),
                         "policy-v2: its files are not the announced ones (sha256")
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))
    code, _, _ = export(capsys, "--peft", tmp_path / "v1", "--store", copy, "--version", 1)
    assert code == 0  # the untouched version still exports


def test_unknown_unannounced_and_bad_requests_are_refused(store, tiny_model_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    one_line_refusal(*export(capsys, "--peft", out, "--store", store, "--version", 9),
                     "unknown version 9: ")
    one_line_refusal(*export(capsys, "--peft", out, "--store", store, "--version", 3),
                     "policy-v3 has no announced record")
    one_line_refusal(*export(capsys, "--peft", out, "--store", store, "--version", 0), "--version must be >= 1")
    one_line_refusal(*export(capsys, "--store", store), "--merged OUT and/or --peft OUT")
    one_line_refusal(*export(capsys, "--peft", out, "--store", tmp_path / "nowhere"), "no such adapter store")
    one_line_refusal(*export(capsys, "--merged", out, "--store", store, "--base-model", model_dir),
                     "policy-v2 was trained on")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_refusal(*export(capsys, "--peft", out, "--store", store), "exists and is not an empty folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, stdout, _ = export(capsys, "--peft", tmp_path / "empty-store-out", "--store", tmp_path)
    one_line_refusal(code, stdout, _, "no announced version to export")

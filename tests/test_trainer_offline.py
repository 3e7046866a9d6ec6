"""`odpo train` and `odpo eval-pairs` on JSONL files with a tiny local Llama: versions, resume, numbers, bad lines."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from core.adapter_store import published_versions
from service.cli import main
from core.settings import TrainerSettings
from trainer.checkpoint import STATE_FILE
from trainer.logps import pair_logps
from trainer.model import load_policy
from trainer.pairs_file import pair_from_record
from trainer.tokenize import tokenize_pair

QA = [("Name a colour.", "Blue.", "I will not."), ("Say hi.", "Hi!", "No."), ("2+2?", "4", "5, I think."),
      ("A fruit?", "An apple.", "A car."), ("Is ice cold?", "Yes.", "Ice is hot.")]


def chat(q, c, r):
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
            "rejected": r}


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def test_train_writes_versions_resumes_and_eval_reports_the_adapter(tiny_model_dir, tmp_path, capsys):
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*qa) for qa in QA])
    store = tmp_path / "store"
    code, rows, _ = run(capsys, "train", "--base-model", tiny_model_dir, "--pairs", pairs_file, "--store", store,
                        "--window-pairs", 2, "--steps-per-window", 3)
    assert code == 0 and [r["version"] for r in rows[:-1]] == [1, 2, 3] and published_versions(store) == [1, 2, 3]
    assert [r["pairs"] for r in rows[:-1]] == [2, 2, 1] and rows[-1]["summary"]["pairs_trained"] == 5
    assert all(r["loss"] < r["loss_first"] for r in rows[:-1])
    ledger = json.loads((store / "policy-v3" / STATE_FILE).read_text())["trained_ids"]
    assert sorted(ledger) == sorted(pair_from_record(chat(*qa)).id for qa in QA)

    code, rows, _ = run(capsys, "train", "--base-model", tiny_model_dir, "--pairs", pairs_file, "--store", store)
    assert code == 0 and rows[-1]["summary"]["pairs_trained"] == 0  # all in the ledger: nothing trains twice
    write(pairs_file, [chat(*qa) for qa in QA] + [chat("New?", "Yes, new.", "Old.")])
    code, rows, _ = run(capsys, "train", "--base-model", tiny_model_dir, "--pairs", pairs_file, "--store", store)
    assert [r["version"] for r in rows[:-1]] == [4] and rows[0]["pairs"] == 1

    code, rows, _ = run(capsys, "eval-pairs", "--base-model", tiny_model_dir, "--adapter", store / "policy-v4",
                        "--pairs", pairs_file, "--beta", 0.2)
    assert code == 0 and len(rows) == 7 and rows[-1]["summary"]["pairs"] == 6
    policy = load_policy(tiny_model_dir, TrainerSettings(), adapter_dir=store / "policy-v4")
    tokenized = [tokenize_pair(pair_from_record(chat(*qa)), policy.tokenizer, 512) for qa in QA]
    with torch.no_grad():
        pol = pair_logps(policy.model, tokenized, policy.device, policy.pad_id)
        with policy.model.disable_adapter():
            ref = pair_logps(policy.model, tokenized, policy.device, policy.pad_id)
    for i, row in enumerate(rows[:5]):
        assert row["line"] == i + 1 and row["id"] == tokenized[i].pair_id
        assert [row["policy_chosen_logp"], row["policy_rejected_logp"]] == pytest.approx(pol[i].tolist(), abs=1e-4)
        assert [row["ref_chosen_logp"], row["ref_rejected_logp"]] == pytest.approx(ref[i].tolist(), abs=1e-4)
        h = ((row["policy_chosen_logp"] - row["ref_chosen_logp"])
             - (row["policy_rejected_logp"] - row["ref_rejected_logp"]))
        assert row["reward_margin"] == pytest.approx(0.2 * h, abs=1e-5)
        assert row["loss"] == pytest.approx(math.log1p(math.exp(-0.2 * h)), abs=1e-5)  # -log sigmoid(beta h)
    assert rows[-1]["summary"]["reward_accuracy"] > 0.5  # the trained adapter prefers chosen


def test_bad_lines_stop_with_exit_2_or_are_skipped_by_line_number(tiny_model_dir, tmp_path, capsys):
    pairs_file = write(tmp_path / "pairs.jsonl", [chat(*QA[0]), "{not json", "", {"prompt": "p", "chosen": "c"},
                                                  chat(*QA[1]), chat(*QA[0])])
    code, rows, err = run(capsys, "eval-pairs", "--base-model", tiny_model_dir, "--pairs", pairs_file)
    assert code == 2 and rows == [] and err.count("\n") == 1
    assert err.startswith("odpo: error:") and "line 2: not JSON" in err

    code, rows, err = run(capsys, "eval-pairs", "--base-model", tiny_model_dir, "--pairs", pairs_file,
                          "--on-error", "skip", "--loss-type", "hinge")
    assert code == 0 and [r["line"] for r in rows[:-1]] == [1, 5]
    assert rows[-1]["summary"] == pytest.approx({**rows[-1]["summary"], "pairs": 2, "skipped_lines": 3})
    assert "line 2: not JSON" in err and "line 4: missing 'rejected'" in err and "also on line 1" in err
    assert all(r["loss"] == pytest.approx(1.0) for r in rows[:-1])  # no adapter: policy = reference, hinge = 1

    for argv, needle in ((("--loss-type", "kto"), "invalid loss_type"), (("--adapter", tmp_path), "not a LoRA"),
                         (("--beta", -1), "invalid beta")):
        code, _, err = run(capsys, "eval-pairs", "--base-model", tiny_model_dir, "--pairs", pairs_file, *argv)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "train", "--base-model", tiny_model_dir, "--pairs", tmp_path / "none.jsonl",
                       "--store", tmp_path / "s")
    assert code == 2 and "no such file" in err


def test_the_cli_imports_no_torch_until_a_trainer_command_runs():
    code = ("import sys, service.cli as c; c.build_parser(); "
            "assert 'torch' not in sys.modules and 'trainer.offline' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False).returncode == 0

"""The pair archive and `odpo pairs export`: every pair once, rotated files, a failing disk withholds the offset
commit instead of losing pairs, and the export loads in `odpo train` and in TRL's DPOTrainer."""

from __future__ import annotations

import errno
import json
import time
import uuid

import pytest
import torch
from kafka import TopicPartition
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.adapter_store import published_versions
from core.bus import publish
from service.cli import main
from core.contracts import (
    TOPIC_PREFERENCES,
    PreferencePair,
    PromptEvent,
    pair_id,
)
from core.settings import TrainerSettings
from tests.test_trainer_crash import random_pairs
from tests.test_trainer_guards import kafka_loop
from tests.test_trainer_service import metric, start_group_at_end
from tests.test_trainer_train import make_pairs
from trainer.archive import PairArchive, archive_files
from trainer.export import archived_pairs, export_pairs
from trainer.model import lora_config
from trainer.pairs_file import pair_from_record
from trainer.tokenize import tokenize_pair

PREFS = TopicPartition(TOPIC_PREFERENCES, 0)


def text_pair(i: int) -> PreferencePair:
    prompt = PromptEvent(id=f"text-{i}", text=f"Question {i}: what is the sky?\nAnswer:", source="test")
    return PreferencePair(id=pair_id(prompt.id, " Blue.", " Green.", 0), prompt=prompt, chosen=" Blue.",
                          rejected=" Green, surely.", policy_version=0, judge="human", chosen_score=1.0,
                          rejected_score=0.0, margin=1.0)


@pytest.fixture()
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_pairs_are_archived_once_in_rotated_files_named_by_time(tmp_path):
    pairs = random_pairs(40, uuid.uuid4().hex[:6])
    first = PairArchive(tmp_path, rotate_bytes=4000)
    for p in pairs[:30] + pairs[:5]:
        first.add(p)
    assert first.pending == 30  # a pair id once per process
    assert first.sync() and first.pending == 0
    first.close()
    second = PairArchive(tmp_path, rotate_bytes=4000)  # the next process: a new file, even if the last had room
    for p in pairs[25:]:  # five of them replayed after a "crash"
        second.add(p)
    second.close()
    files = archive_files(tmp_path)
    assert len(files) >= 3 and all(f.stat().st_size <= 4000 for f in files)
    assert len({f.name.split("-")[2] for f in files}) == 1  # one pid: both "processes" are this one ...
    assert files[-1].name.endswith(f"-{second._index:04d}.jsonl")
    lines = [PreferencePair.from_bytes(x) for f in files for x in f.read_bytes().splitlines()]
    assert len(lines) == 45 and lines == pairs[:30] + pairs[25:]  # ... and each line is the contract message
    assert list(archived_pairs(tmp_path)) == pairs  # the reader keeps each id once, in write order


def test_a_failing_disk_keeps_the_pairs_pending_and_says_so(tmp_path, monkeypatch):
    import trainer.archive as archive_mod

    pairs = random_pairs(6, uuid.uuid4().hex[:6])
    archive = PairArchive(tmp_path, retry_s=0)
    errors_before = metric("odpo_trainer_archive_errors_total")
    real_fsync = archive_mod.os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    for p in pairs[:3]:
        archive.add(p)
    monkeypatch.setattr(archive_mod.os, "fsync", full_disk)
    assert archive.sync() is False and archive.pending == 3 and archive.failing
    assert metric("odpo_trainer_archive_errors_total") - errors_before == 1
    assert metric("odpo_trainer_archive_pending_pairs") == 3
    for p in pairs[3:]:
        archive.add(p)
    archive.retry_s = 60
    assert archive.sync() is False  # not retried at once: no log storm on a full disk
    assert metric("odpo_trainer_archive_errors_total") - errors_before == 1
    monkeypatch.setattr(archive_mod.os, "fsync", real_fsync)
    archive.retry_s = 0
    assert archive.sync() is True and archive.pending == 0 and not archive.failing
    archive.close()
    assert list(archived_pairs(tmp_path)) == pairs  # nothing lost; a line written twice is read once


def _loop_from_end(broker, producer, group_id, tiny_model_dir, tmp_path, **settings):
    """A trainer loop whose group starts at the topic's end: (store, start offset, loop)."""
    store = tmp_path / "store"
    start = start_group_at_end(broker.bootstrap, group_id)
    return store, start, kafka_loop(broker, producer, group_id, tiny_model_dir, store, **settings)


def test_a_loop_whose_archive_fails_commits_nothing_until_it_works(broker, producer, group_id, tiny_model_dir,
                                                                   tmp_path):
    store, start, loop = _loop_from_end(broker, producer, group_id, tiny_model_dir, tmp_path, window_pairs=2,
                                        steps_per_window=1)
    inbox = loop.inbox
    loop.archive.retry_s = 0
    real_write = loop.archive._write_pending

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    loop.archive._write_pending = full_disk
    pairs = random_pairs(2, uuid.uuid4().hex[:6])
    try:
        for p in pairs:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        deadline = time.monotonic() + 60
        while loop.trainer.version == 0 and time.monotonic() < deadline:
            loop.tick(timeout_ms=200)
        assert loop.trainer.version == 1  # trained and published all the same ...
        assert _committed(inbox) in (None, start)  # ... but the offsets wait for the archive
        loop.archive._write_pending = real_write
        loop.tick(timeout_ms=200)
        # (>=: the session broker is shared, another module's pair may follow ours on the topic)
        assert _committed(inbox) >= start + len(pairs)
    finally:
        loop.archive.close()
        inbox.close()
    assert {p.id for p in archived_pairs(store)} >= {p.id for p in pairs}


def test_a_stopping_trainer_archives_the_pairs_still_on_the_topic_and_commits_none(broker, producer, group_id,
                                                                                    tiny_model_dir, tmp_path):
    """odpo up's broker keeps messages in memory and stops with the run: pairs published while the last window
    trained would be lost unless the trainer archives them on its way out (untrained, uncommitted)."""
    store, start, loop = _loop_from_end(broker, producer, group_id, tiny_model_dir, tmp_path, window_pairs=50)
    inbox = loop.inbox
    pairs = random_pairs(3, uuid.uuid4().hex[:6])
    try:
        deadline = time.monotonic() + 30
        while not inbox.consumer.assignment() and time.monotonic() < deadline:  # a member, as a running trainer is
            loop.tick(timeout_ms=200)
        for p in pairs:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p)
        assert loop.archive_backlog() >= len(pairs)
        assert loop.trainer.version == 0 and _committed(inbox) in (None, start)  # nothing trained or committed
    finally:
        loop.archive.close()
        inbox.close()
    assert {p.id for p in archived_pairs(store)} >= {p.id for p in pairs}


def _committed(inbox):
    return inbox.consumer.committed(PREFS)


def _archive(store, pairs_per_process):
    """An archive as processes leave it: one PairArchive each; the last one killed mid-line."""
    for pairs in pairs_per_process:
        a = PairArchive(store)
        for p in pairs:
            a.add(p)
        a.close()
    with open(archive_files(store)[-1], "ab") as f:
        f.write(b'{"schema_version": 1, "id": "torn')


def test_export_round_trip_each_pair_once_in_both_formats(tok, tmp_path, capsys):
    store = tmp_path / "store"
    chat, text = make_pairs(tok, 5, tag=uuid.uuid4().hex[:6]), [text_pair(i) for i in range(2)]
    _archive(store, [chat[:3] + text[:1], chat[1:] + text])  # a replay after a crash wrote some again

    assert main(["pairs", "export", "--store", str(store), "--out", str(tmp_path / "odpo.jsonl"),
                 "--format", "odpo"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("exported 7 pairs (odpo)") and "3 duplicates skipped, 2 archive files read" in summary
    assert "1 torn last line(s) skipped" in summary
    exported = [PreferencePair.from_bytes(x) for x in (tmp_path / "odpo.jsonl").read_bytes().splitlines()]
    assert exported == chat[:3] + text[:1] + chat[3:] + text[1:]  # token ids, scores, versions: all kept

    out = tmp_path / "trl.jsonl"
    s = export_pairs(store, out, "trl")
    assert (s.written, s.text_written, s.text_out) == (5, 2, tmp_path / "trl.text.jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert set(rows[0]) == {"id", "prompt", "chosen", "rejected", "prompt_id", "policy_version", "judged_by",
                            "chosen_score", "rejected_score", "margin", "created_at"}
    assert rows[0]["prompt"] == [{"role": "user", "content": chat[0].prompt.messages[0].content}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": chat[0].chosen}]
    for row, pair in zip(rows + [json.loads(x) for x in s.text_out.read_text().splitlines()], chat + text):
        back = pair_from_record(row)  # what `odpo train` and `odpo pairs load` make of the line
        assert (back.id, back.prompt.messages, back.prompt.text, back.chosen, back.rejected) == \
            (pair.id, pair.prompt.messages, pair.prompt.text, pair.chosen, pair.rejected)
    only_chat = tmp_path / "chat-store"
    _archive(only_chat, [chat])
    s = export_pairs(only_chat, tmp_path / "chat.jsonl")
    assert (s.written, s.text_out) == (5, None)


def test_export_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["pairs", "export", "--store", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("odpo: error: ") and "no pair archive" in err and err.count("\n") == 1
    store = tmp_path / "store"
    _archive(store, [random_pairs(3, "bad")])
    path = archive_files(store)[0]
    path.write_bytes(b"{not json\n" + path.read_bytes())
    assert main(["pairs", "export", "--store", str(store), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path.name}:1: not a PreferencePair" in err and err.count("\n") == 1 and not out.exists()
    assert main(["pairs", "export", "--store", str(store), "--out", str(tmp_path / "no" / "dir.jsonl")]) == 2


def test_the_trl_export_trains_with_odpo_train(tok, tiny_model_dir, tmp_path, capsys):
    store, pairs = tmp_path / "store", make_pairs(tok, 6, tag=uuid.uuid4().hex[:6])
    _archive(store, [pairs])
    out = tmp_path / "trl.jsonl"
    export_pairs(store, out, "trl")
    train_store = tmp_path / "train-store"
    code = main(["train", "--base-model", str(tiny_model_dir), "--pairs", str(out), "--store", str(train_store),
                 "--window-pairs", "3", "--steps-per-window", "1"])
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert code == 0 and rows[-1]["summary"]["pairs_trained"] == 6 and published_versions(train_store) == [1, 2]
    from trainer.ledger import trained_ledger

    assert sorted(i for ids in trained_ledger(train_store).values() for i in ids) == sorted(p.id for p in pairs)
    odpo_out = tmp_path / "odpo.jsonl"  # the odpo format into the same store: all in the ledger already
    export_pairs(store, odpo_out, "odpo")
    assert main(["train", "--base-model", str(tiny_model_dir), "--pairs", str(odpo_out), "--store",
                 str(train_store)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert rows[-1]["summary"]["pairs_trained"] == 0


def test_the_trl_export_is_a_dpo_trainer_dataset(tok, tiny_model_dir, tmp_path):
    trl = pytest.importorskip("trl", minversion="1.16.0")
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    store, pairs = tmp_path / "store", make_pairs(tok, 4, tag=uuid.uuid4().hex[:6])
    _archive(store, [pairs])
    out = tmp_path / "trl.jsonl"
    export_pairs(store, out, "trl")
    dataset = datasets.Dataset.from_json(str(out))
    assert is_conversational(dataset[0]) and len(dataset) == 4
    templated = maybe_apply_chat_template(dataset[0], tok)
    assert templated["prompt"].endswith("<|im_start|>assistant\n") and pairs[0].chosen in templated["chosen"]

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, bf16=False, max_length=256, save_strategy="no", max_steps=1,
                         logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tr = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                        peft_config=lora_config(TrainerSettings()))
    for i, pair in enumerate(pairs):  # TRL tokenizes each row as odpo does the same pair from its text
        row = tr.train_dataset[i]
        ours = tokenize_pair(pair.model_copy(update={"prompt_token_ids": None, "chosen_token_ids": None,
                                                     "rejected_token_ids": None}), tok, 256)
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == \
            (list(ours.prompt_ids), list(ours.chosen_ids), list(ours.rejected_ids))
    result = tr.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))

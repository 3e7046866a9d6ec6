"""`odpo pairs load` / `odpo prompts load`: every line checked, bad ones reported by number, the rest on Kafka."""

from __future__ import annotations

import json
import uuid

import pytest

from service.cli import main
from core.contracts import (
    TOPIC_PREFERENCES,
    TOPIC_PROMPTS,
    PreferencePair,
    PromptEvent,
    pair_id,
)
from core.dataset_load import PARSERS, SOURCE, parse_lines
from tests.test_judge_service import read_until

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]


def lines(*records) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in records]


GOOD_PAIRS = lines(
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "extra_column": 3},
    {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Hi!"}], "rejected": "No.", "id": "named-pair"},
)
BAD_PAIRS = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "Say hi.", "chosen": "Hi!"}), "missing 'rejected'"),
    (json.dumps({"prompt": "Say hi.", "chosen": "Same.", "rejected": "Same."}), "identical"),
    (json.dumps({"prompt": 42, "chosen": "a", "rejected": "b"}), "string or a list of chat messages"),
    (json.dumps({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}), "role"),
    (json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}), "user turn"),
    (json.dumps({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}), "assistant"),
    (json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b", "id": 7}), "`id`"),
]


def test_pair_lines_in_both_preference_forms():
    loaded = parse_lines(GOOD_PAIRS + [GOOD_PAIRS[0]], PARSERS["pairs"])
    assert loaded.errors == [] and loaded.duplicates == 1
    (k1, p1), (_, p2) = loaded.messages
    assert p1.prompt.text == "Say hi." and (p1.chosen, p1.rejected, p1.judge, p1.policy_version) == \
        ("Hi!", "Go away.", SOURCE, 0)
    assert p1.id == pair_id(p1.prompt.id, "Hi!", "Go away.", 0) and k1 == p1.prompt.id
    assert [m.model_dump() for m in p2.prompt.messages] == CHAT and p2.id == "named-pair" and p2.chosen == "Hi!"
    # A pair dumped from odpo.preferences loads back as itself.
    again = parse_lines([p2.model_dump_json()], PARSERS["pairs"]).messages
    assert again == [(p2.prompt.id, p2)]


def test_same_pairs_and_ids_as_the_trainers_offline_reader():
    """A file loaded onto Kafka and the same file trained offline must dedupe in the trainer's ledger."""
    from trainer.pairs_file import pair_from_record

    for line in GOOD_PAIRS:
        loaded = parse_lines([line], PARSERS["pairs"]).messages[0][1]
        offline = pair_from_record(json.loads(line))
        assert loaded.model_dump(exclude={"created_at"}) == offline.model_dump(exclude={"created_at"})


def test_every_bad_pair_line_is_reported_with_its_number():
    loaded = parse_lines([GOOD_PAIRS[0], ""] + [text for text, _ in BAD_PAIRS], PARSERS["pairs"])
    assert len(loaded.messages) == 1
    assert [n for n, _ in loaded.errors] == list(range(3, 3 + len(BAD_PAIRS)))  # line 2 is blank: skipped
    for (_, reason), (_, needle) in zip(loaded.errors, BAD_PAIRS):
        assert needle in reason, (needle, reason)


def test_prompt_lines():
    loaded = parse_lines(lines(
        {"prompt": "Describe the sea."},
        {"messages": CHAT, "id": "p-7", "task": {"kind": "exact", "answer": "hi"}, "source": "my-set"},
        {"text": "Once upon a time"},
        {"prompt": "x", "text": "y"},
        {"prompt": ""},
        {"messages": "Say hi."},
        {"id": "no-form"},
    ), PARSERS["prompts"])
    (_, a), (_, b), (_, c) = loaded.messages
    assert a.text == "Describe the sea." and a.id.startswith(f"{SOURCE}-") and a.source == SOURCE
    assert b.id == "p-7" and b.task == {"kind": "exact", "answer": "hi"} and b.source == "my-set"
    assert c.text == "Once upon a time"
    assert [n for n, _ in loaded.errors] == [4, 5, 6, 7]
    assert "exactly one of" in loaded.errors[0][1] and "blank" in loaded.errors[1][1]


@pytest.fixture()
def on_broker(own_broker, monkeypatch):
    monkeypatch.setenv("ODPO_BOOTSTRAP_SERVERS", own_broker.bootstrap)
    return own_broker.bootstrap


def test_cli_publishes_a_good_file_and_nothing_of_a_bad_one(on_broker, tmp_path, capsys):
    run_id = uuid.uuid4().hex[:8]
    good = [{"prompt": f"Say hi {run_id}-{i}.", "chosen": "Hi!", "rejected": "Go away."} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines(*good)) + "\n")
    assert main(["pairs", "load", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"published 3 pairs to {TOPIC_PREFERENCES}"

    texts = {f"Say hi {run_id}-{i}." for i in range(3)}
    mine = lambda r: PreferencePair.from_bytes(r.value).prompt.text in texts
    found = read_until(on_broker, TOPIC_PREFERENCES, mine, lambda f: len(f) >= 3)
    assert sorted(PreferencePair.from_bytes(r.value).prompt.text for r in found) == sorted(texts)
    assert all(r.key.decode() == PreferencePair.from_bytes(r.value).prompt.id for r in found)

    bad = tmp_path / "bad.jsonl"
    bad_text = {"prompt": f"Bad file {run_id}.", "chosen": "a", "rejected": "b"}
    bad.write_text("\n".join(lines(bad_text, "{oops", {"prompt": "x"})) + "\n")
    assert main(["pairs", "load", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{bad}:2: not JSON") and err[1].startswith(f"{bad}:3: missing 'chosen', 'rejected'")
    assert err[2].startswith("odpo: error: 2 bad line(s)") and len(err) == 3

    assert main(["pairs", "load", str(bad), "--on-error", "skip"]) == 0
    out = capsys.readouterr()
    assert "published 1 pairs" in out.out and "2 bad line(s) skipped" in out.out and f"{bad}:2:" in out.err
    mine_bad = lambda r: PreferencePair.from_bytes(r.value).prompt.text == f"Bad file {run_id}."
    assert len(read_until(on_broker, TOPIC_PREFERENCES, mine_bad, lambda f: len(f) >= 1)) == 1  # once, the skip run


def test_cli_loads_prompts(on_broker, tmp_path, capsys):
    run_id = uuid.uuid4().hex[:8]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines({"prompt": CHAT, "id": f"{run_id}-a"}, {"text": "hello", "id": f"{run_id}-b"})))
    assert main(["prompts", "load", str(path)]) == 0
    mine = lambda r: r.key is not None and r.key.decode().startswith(run_id)
    found = read_until(on_broker, TOPIC_PROMPTS, mine, lambda f: len(f) >= 2)
    assert {PromptEvent.from_bytes(r.value).id for r in found} == {f"{run_id}-a", f"{run_id}-b"}
    assert main(["prompts", "load", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["prompts", "load", str(tmp_path / "empty.jsonl")]) == 2
    assert "no valid prompts" in capsys.readouterr().err

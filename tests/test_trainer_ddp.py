"""The trainer data-parallel under torchrun (2 ranks, gloo, CPU, the tiny Llama): same numbers as one process,
and exactly-once through kill -9 of either rank.

1. `odpo train` on a pairs file with 2 ranks (DDP, and FSDP over the frozen base) writes the same
   adapters as one process: every LoRA tensor of every version within 1e-5, the same losses. The
   setup splits unevenly on purpose: windows of 6 and 5 pairs, steps of 4 pairs and of 1 (one rank
   then has no pair of that step), micro-batches of 1 pair, an RPO term (per-token scaling).
2. `odpo trainer` on the real broker with 2 ranks: rank 1 is killed with SIGKILL mid-run (the ranks run
   as plain processes, no torchrun agent to tear the group down) and rank 0 must exit non-zero by
   itself (a collective fails or times out: `dist_timeout_s`); then under torchrun (`--max-restarts 1`)
   rank 0 is killed and torchrun restarts the group, which finishes. The ledger holds every pair
   exactly once, every version was announced with its folder's digest, and a single process replaying
   the ledger's windows makes the same adapter as each stored version (within 1e-5).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import TopicPartition
from safetensors.torch import load_file

from core.adapter_store import adapter_digest, published_version, published_versions
from core.bus import make_producer, publish
from core.contracts import (
    TOPIC_ADAPTERS,
    TOPIC_PREFERENCES,
    AdapterReady,
    PreferencePair,
    PromptEvent,
    pair_id,
)
from tests.test_trainer_crash import state_of
from tests.test_trainer_service import end_offset, read_from, start_group_at_end
from trainer.export import archived_pairs
from trainer.ledger import trained_ledger

TOL = 1e-5
QA = [("Name a colour.", "Blue.", "I will not."), ("Say hi.", "Hi!", "No."), ("2+2?", "4", "5, I think."),
      ("A fruit?", "An apple.", "A car."), ("Is ice cold?", "Yes.", "Ice is hot."),
      ("Capital of France?", "Paris.", "London, in England."), ("What is 3+3?", "6.", "Seven, probably."),
      ("Name a dog breed.", "Beagle.", "A cat."), ("Opposite of up?", "Down.", "Sideways."),
      ("Colour of grass?", "Green.", "Purple, mostly."), ("Largest planet?", "Jupiter.", "The Moon.")]
TRAIN_ARGS = ("--window-pairs", "6", "--steps-per-window", "3", "--batch-pairs", "1")
TRAIN_ENV = {"ODPO_TRAINER_STEP_PAIRS": "4", "ODPO_TRAINER_RPO_ALPHA": "0.5", "ODPO_TRAINER_LEARNING_RATE": "5e-3"}
N_PAIRS, WINDOW, STEPS = 40, 8, 4


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ODPO_ settings or torchrun's variables, plus `extra`."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ODPO_", "TORCHELASTIC_")) and k not in drop}
    env.update(extra)
    return env


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "--monitor-interval", "0.5", "-m", "service.cli", *args]


def lora_diff(a: dict, b: dict) -> float:
    """Max |a - b| over every LoRA tensor (the same names in both)."""
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def adapter(store: Path, version: int) -> dict:
    return load_file(store / f"policy-v{version}" / "adapter_model.safetensors")


def test_without_torchrun_nothing_is_distributed_and_shards_cover_a_step(monkeypatch):
    import torch.distributed as dist

    from core.settings import TrainerSettings
    from trainer.distributed import SOLO, Ranks

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert Ranks.from_env(TrainerSettings()) is SOLO and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: one process, as without it
    assert Ranks.from_env(TrainerSettings()) is SOLO and not dist.is_initialized()
    for n, size in ((7, 3), (8, 2), (1, 2), (5, 4)):
        shards = [Ranks(rank=r, size=size).shard(list(range(n))) for r in range(size)]
        assert [i for s in shards for i in s] == list(range(n))  # every pair once, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


# -- 1. odpo train: 2 ranks = 1 process --------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}],
                                        "chosen": [{"role": "assistant", "content": c}], "rejected": r}) + "\n"
                            for q, c, r in QA))
    return path


def odpo_train(cmd_head: list[str], model: Path, pairs: Path, store: Path, **env: str) -> list[dict]:
    proc = subprocess.run([*cmd_head, "train", "--base-model", str(model), "--pairs", str(pairs), "--store",
                           str(store), *TRAIN_ARGS], env=clean_env(**TRAIN_ENV, **env), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, list[dict]]:
    store = tmp_path_factory.mktemp("ddp-one") / "store"
    return store, odpo_train([sys.executable, "-m", "service.cli"], tiny_model_dir, pairs_file, store)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_odpo_train_on_two_ranks_writes_the_adapters_of_one_process(parallel, one_process, tiny_model_dir,
                                                                   pairs_file, tmp_path):
    store1, rows1 = one_process
    store2 = tmp_path / "store"
    rows2 = odpo_train(torchrun(), tiny_model_dir, pairs_file, store2, ODPO_TRAINER_PARALLEL=parallel)
    assert [r["summary"] for r in rows2 if "summary" in r] and len(rows2) == len(rows1) == 3  # rank 0 alone prints
    assert [r["pairs"] for r in rows2[:-1]] == [r["pairs"] for r in rows1[:-1]] == [6, 5]
    assert published_versions(store2) == published_versions(store1) == [1, 2]
    for r1, r2 in zip(rows1[:-1], rows2[:-1]):
        for key in ("loss_first", "loss", "reward_margin", "reward_accuracy"):  # gathered from both ranks
            assert r2[key] == pytest.approx(r1[key], abs=TOL), key
    for v in (1, 2):  # the gradient's norm before clipping: the ranks' gradients add up to one process's
        g1, g2 = (state_of(s, v)["metrics"]["grad_norm"] for s in (store1, store2))
        assert g2 == pytest.approx(g1, rel=TOL), (v, g1, g2)
    diffs = [lora_diff(adapter(store1, v), adapter(store2, v)) for v in (1, 2)]
    moved = max(t.abs().max().item() for k, t in adapter(store2, 2).items() if "lora_B" in k)
    print(f"{parallel}: max |2 ranks - 1 process| per version {diffs}; largest lora_B {moved:.4f}")
    assert max(diffs) <= TOL and moved > 1000 * TOL  # equal, and far from the zero lora_B of version 0
    assert trained_ledger(store2) == trained_ledger(store1)


# -- 2. odpo trainer on Kafka: kill -9 of either rank -----------------------------------------------------
def long_pairs(n: int, tag: str, vocab: int = 49152) -> list[PreferencePair]:
    """Generator-style pairs with token ids, long enough that a window's training outlasts a poll of Kafka."""
    rng = random.Random(tag)

    def ids(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    out = []
    for i in range(n):
        prompt = PromptEvent(id=f"ddp-{tag}-{i}", text=f"prompt {i}", source="test")
        out.append(PreferencePair(id=pair_id(prompt.id, f"c{i}", f"r{i}", 0), prompt=prompt, chosen=f"c{i}",
                                  rejected=f"r{i}", prompt_token_ids=ids(rng.randint(32, 48)),
                                  chosen_token_ids=ids(rng.randint(16, 24)) + [2],
                                  rejected_token_ids=ids(rng.randint(16, 24)) + [2], policy_version=0, judge="test"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=`rank`, if it runs."""
    for pid in children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def newest(store: Path) -> int:
    versions = published_versions(store)
    return versions[-1] if versions else 0


def wait_for(cond, procs: list[subprocess.Popen], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a process exited ({p.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_training(pid: int, procs: list[subprocess.Popen], timeout_s: float = 60) -> None:
    """Until process `pid` (a rank) burns CPU: it is in a window (a rank waiting for a command sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = cpu_ticks(pid)
        time.sleep(0.1)
        if cpu_ticks(pid) - before >= 5:  # half a core over 0.1 s (100 ticks per second)
            return
        for p in procs:
            assert p.poll() is None, f"a process exited ({p.returncode}) before a window"
    raise AssertionError("no rank trained within the time")


def during(log_text: str) -> str:
    """Where the survivor's collective failed, from its traceback: in a window or while idle."""
    if "train_window" in log_text:
        return "in a window"
    return "idle" if "keepalive" in log_text or "in receive" in log_text or "send" in log_text else "?"


def single_process_replay(model: Path, store: Path, pairs: dict, ledger: dict[int, list[str]]) -> dict[int, float]:
    """Train the ledger's windows in this process, in order; max |stored - replayed| LoRA per stored version."""
    from peft import get_peft_model_state_dict

    from core.settings import TrainerSettings
    from trainer.recipe import Trainer

    settings = TrainerSettings(window_pairs=WINDOW, steps_per_window=STEPS)
    trainer = Trainer.open(model, settings)
    diffs = {}
    for version in sorted(ledger):
        window = [trainer.tokenize(pairs[i]) for i in ledger[version]]
        result = trainer.train_window(window)
        assert result.publishable
        trainer.follow_version(ledger[version], result)
        assert state_of(store, version)["metrics"]["grad_norm"] == pytest.approx(result.grad_norm, rel=TOL)
        if version in published_versions(store):
            diffs[version] = lora_diff(adapter(store, version), get_peft_model_state_dict(trainer.policy.model))
    return diffs


def test_kafka_trainer_on_two_ranks_survives_kill_9_of_either_rank(own_broker, group_id, tiny_model_dir, tmp_path):
    # the module's own broker: on the session broker, pairs other modules' components still publish would join
    bootstrap, store = own_broker.bootstrap, tmp_path / "store"
    producer = make_producer(bootstrap)
    start_group_at_end(bootstrap, group_id)
    adapters_start = end_offset(bootstrap, TopicPartition(TOPIC_ADAPTERS, 0))
    pairs = long_pairs(N_PAIRS, uuid.uuid4().hex[:6])
    env = clean_env(ODPO_BOOTSTRAP_SERVERS=bootstrap, ODPO_STORE_DIR=str(store), ODPO_BASE_MODEL=str(tiny_model_dir),
                    ODPO_LOG_LEVEL="INFO", ODPO_TRAINER_GROUP_ID=group_id, ODPO_TRAINER_WINDOW_PAIRS=str(WINDOW),
                    ODPO_TRAINER_WINDOW_SECONDS="1", ODPO_TRAINER_STEPS_PER_WINDOW=str(STEPS),
                    ODPO_TRAINER_MAX_STALENESS="1000", ODPO_TRAINER_METRICS_PORT="0",
                    ODPO_TRAINER_KEEP_VERSIONS="0", ODPO_TRAINER_DIST_TIMEOUT_S="20")
    rng = random.Random(7)

    def send(batch):
        for p in batch:
            publish(producer, TOPIC_PREFERENCES, p.prompt.id, p, flush=False)
        producer.flush()

    # (a) two ranks as plain processes; SIGKILL rank 1 mid-run: rank 0 exits non-zero on its own
    send(pairs[:24])
    port = free_port()
    log_a = tmp_path / "ranks.log"
    with open(log_a, "wb") as log_file:
        ranks = [subprocess.Popen([sys.executable, "-m", "service.cli", "trainer"], stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**env, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
        try:
            wait_for(lambda: newest(store) >= 1, ranks, 120, "version 1 from two ranks")
            wait_until_training(ranks[1].pid, ranks)
            time.sleep(rng.uniform(0, 0.2))
            os.kill(ranks[1].pid, signal.SIGKILL)
            t_kill = time.monotonic()
            rc0 = ranks[0].wait(timeout=120)  # the group's timeout is 20 s: no hanging in a collective
            exit_s = time.monotonic() - t_kill
        finally:
            for p in ranks:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(timeout=30)
    after_a = newest(store)
    text_a = log_a.read_text()
    assert rc0 != 0, text_a[-3000:]

    # (b) torchrun with one restart: SIGKILL rank 0 mid-run; the restarted group trains everything left
    send(pairs[24:])
    log_b = tmp_path / "torchrun.log"
    with open(log_b, "wb") as log_file:
        run = subprocess.Popen(torchrun("trainer", restarts=1), stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
        try:
            wait_for(lambda: newest(store) > after_a, [run], 120, "a version from the torchrun group")
            victim, follower = rank_pid(run.pid, 0), rank_pid(run.pid, 1)
            assert victim is not None and follower is not None
            wait_until_training(follower, [run])
            time.sleep(rng.uniform(0, 0.2))
            os.kill(victim, signal.SIGKILL)
            killed_at = newest(store)
            all_ids = {p.id for p in pairs}
            wait_for(lambda: newest(store) > 0 and set(state_of(store, newest(store))["trained_ids"]) >= all_ids,
                     [run], 180, "every pair in the ledger after torchrun's restart")
            end = newest(store)
            wait_for(lambda: published_version(store) == end, [run], 30, "the last announcement")
        finally:
            os.killpg(run.pid, signal.SIGTERM)  # torchrun and its workers, as a pod's termination does
            rc_b = run.wait(timeout=90)
    producer.close()
    text_b = log_b.read_text()
    print(f"rank 1 killed ({during(text_a)}): rank 0 exited {rc0} after {exit_s:.1f}s (versions on disk {after_a}); "
          f"rank 0 killed under torchrun ({during(text_b)}) at version {killed_at}, torchrun restarted the group; "
          f"end version {end}, torchrun exit {rc_b}")
    assert text_b.count("rank 1 of 2") >= 2, text_b[-3000:]  # two generations of the group

    ledger = trained_ledger(store)
    assert sorted(ledger) == list(range(1, end + 1)) == published_versions(store)
    lineage = [i for v in sorted(ledger) for i in ledger[v]]
    assert len(lineage) == len(set(lineage)) == N_PAIRS  # no pair trained twice ...
    assert set(lineage) == {p.id for p in pairs}  # ... and none lost
    for v in ledger:
        st = state_of(store, v)
        assert st["version"] == v and st["parent_version"] == v - 1 and st["window_ids"] == ledger[v]
    assert {p.id for p in archived_pairs(store)} >= {p.id for p in pairs}
    announced = [AdapterReady.from_bytes(r.value) for r in read_from(
        bootstrap, TOPIC_ADAPTERS, adapters_start,
        lambda rs: {AdapterReady.from_bytes(r.value).version for r in rs} >= set(ledger), timeout_s=30)]
    assert {a.version for a in announced} >= set(ledger)
    for a in announced:
        if a.version in ledger:
            assert a.sha256 == adapter_digest(store / a.path)
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]

    diffs = single_process_replay(tiny_model_dir, store, {p.id: p for p in pairs}, ledger)
    print(f"max |2-rank version - single-process replay| by version: {diffs}")
    assert set(diffs) == set(ledger) and max(diffs.values()) <= TOL

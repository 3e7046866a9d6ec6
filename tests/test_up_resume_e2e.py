"""A real resume (heavy: two `odpo up` runs with vLLM, about 5 minutes on 2 cores; run it under
`flock /tmp/odpo-heavy.lock`): `odpo up --rounds 1` makes policy-v1 (and maybe v2 while it stops: the trainer
stops last); a second `odpo up --rounds 1` on the same run folder says "resumed at version N" (the store's
newest), keeps the gate's decisions, feeds the prompts after the first run's, and makes policy-v<N+1> from
pairs sampled by vN, with no pair dropped as stale.

The trainer runs with max_staleness 0, so a generator that came back sampling `base` (because the new broker's
odpo.adapters is empty) would have every pair dropped and v2 would never come: the generator must take the
newest version from the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.adapter_store import newest_ready
from core.broker import free_port
from core.bus import TopicTail
from core.contracts import TOPIC_PREFERENCES, PreferencePair
from service.prompt_feed import load_position
from service.up_metrics import sample_value

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

# Fast loop settings for 2 cores: short answers, a 4-pair window, a gate on 4 prompts that promotes any version
# (this checks resuming, not learning).
LOOP_ENV = {"ODPO_GENERATOR_MAX_TOKENS": "24", "ODPO_TRAINER_STEPS_PER_WINDOW": "2", "ODPO_TRAINER_MAX_STALENESS": "0",
            "ODPO_GATE_PROMOTION_TOLERANCE": "1", "ODPO_GATE_REFERENCE_LOGPROB": "false",
            **{f"ODPO_GATE_LIMIT_{s}": "1" for s in ("MEAN_WORDS", "EMPTY_SHARE", "DISTINCT2", "ON_TOPIC_SHARE",
                                                      "GUARD_PASS")},
            "ODPO_GATE_LIMIT_REF_LOGPROB": "100", "HF_HUB_OFFLINE": "1"}


class Up:
    """One `odpo up --rounds 1` on `run`, watched from outside: the store, the trainer's /metrics, the pairs."""

    def __init__(self, run: Path, model_dir: Path, out: Path):
        self.run, self.metrics_port = run, free_port()
        env = {**os.environ, **LOOP_ENV, "ODPO_BASE_MODEL": str(model_dir),
               "ODPO_TRAINER_METRICS_PORT": str(self.metrics_port)}
        cmd = [sys.executable, "-m", "service.cli", "up", "--rounds", "1", "--run-dir", str(run), "--port",
               str(free_port()), "--window-pairs", "4", "--heldout-prompts", "4", "--heldout-prompts-max", "4"]
        self.out = out
        self.started = time.monotonic()
        with open(out, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.tail: TopicTail | None = None
        self.pair_versions: list[int] = []

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def follow_pairs(self) -> None:
        if self.tail is None:
            line = next((x for x in self.text().splitlines() if x.startswith("broker: Tansu on ")), None)
            if line is None:
                return
            self.tail = TopicTail(line.split()[-1], [TOPIC_PREFERENCES], client_id="odpo-test-resume")
        self.pair_versions += [PreferencePair.from_bytes(r.value).policy_version for r in self.tail.poll(200)]

    def trainer_metrics(self) -> tuple[float | None, float | None]:
        """(pairs the trainer dropped as stale, its version), read in one scrape."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3).text
        except httpx.HTTPError:
            return None, None
        return (sample_value(text, "odpo_trainer_pairs_dropped_total", {"reason": "stale"}),
                sample_value(text, "odpo_trainer_policy_version"))

    def until_version(self, version: int, timeout_s: float) -> tuple[float, float | None, float | None]:
        """Wait until `policy-v<version>` is in the store; (seconds it took, the trainer's stale drops when the
        first pair sampled by version-1 appeared, and while the trainer was still at version-1: once it
        publishes `version`, pairs of version-1 still on their way are stale by design with max_staleness 0)."""
        deadline, first_fresh_drops, before = self.started + timeout_s, None, None
        manifest = self.run / "store" / "announced" / f"policy-v{version}.json"
        while not manifest.exists():
            assert self.proc.poll() is None, f"odpo up exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no policy-v{version} within {timeout_s:.0f}s:\n{self.text()[-3000:]}"
            self.follow_pairs()
            drops, at = self.trainer_metrics()
            if drops is not None and at is not None and at < version:
                before = drops
                if first_fresh_drops is None and version - 1 in self.pair_versions:
                    first_fresh_drops = drops
            time.sleep(0.5)
        return time.monotonic() - self.started, first_fresh_drops, before

    def finish(self, timeout_s: float) -> dict:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(timeout=60)
            if self.tail:
                self.tail.close()
        assert rc == 0, self.text()[-3000:]
        return json.loads((self.run / "summary.json").read_text())


def test_a_second_up_on_the_same_run_folder_continues(tmp_path, model_dir):
    run = tmp_path / "run"
    first = Up(run, model_dir, tmp_path / "up1.out")
    first_s, _, _ = first.until_version(1, timeout_s=420)
    s1 = first.finish(timeout_s=240)
    fed = load_position(run)
    assert fed > 0 and s1["resumed_from"] is None
    registry = json.loads((run / "store" / "gate-registry.json").read_text())
    # the trainer stops last, so it may publish one more version while `odpo up` stops: resume from the newest
    last = newest_ready(run / "store").version
    assert last >= 1

    second = Up(run, model_dir, tmp_path / "up2.out")
    second_s, drops_when_fresh, drops_at_next = second.until_version(last + 1, timeout_s=420)
    s2 = second.finish(timeout_s=240)
    print(f"policy-v1 after {first_s:.0f}s in a fresh run; policy-v{last + 1} after {second_s:.0f}s resumed; pairs "
          f"by version in the second run {sorted(set(second.pair_versions))}; stale drops when the first "
          f"v{last} pair appeared {drops_when_fresh}, before v{last + 1} {drops_at_next}")
    text = second.text()
    assert f"resumed at version {last}" in text and f"prompts continue after the {fed} already fed" in text
    assert s2["resumed_from"] == last and load_position(run) > fed
    assert drops_when_fresh is not None and drops_at_next == drops_when_fresh == 0, "no pair dropped as stale"
    assert last in second.pair_versions, f"the generator sampled with v{last} (from the store), not base"
    by_name = {v["name"]: v for v in s2["versions"]}
    newest = by_name[f"policy-v{last + 1}"]
    assert newest["status"] in ("passed", "refused") and newest["score"] is not None
    decided = {r["version"]: r for r in registry["records"] if r["score"] is not None}
    assert {0, 1} <= set(decided)
    for version, rec in decided.items():  # the gate's decisions are kept, not made again
        name = "base" if version == 0 else f"policy-v{version}"
        assert (by_name[name]["status"], by_name[name]["score"]) == (rec["status"], rec["score"]), name
    assert second_s <= 2 * first_s + 60, (first_s, second_s)

"""The short chaos run (benchmarks/chaos.py) on real parts: `odpo up` with clients on the gateway, and the
trainer and the memory-only broker killed with SIGKILL in turn: the exactly-once ledger across a trainer
restart, and a broker that comes back empty (topics recreated, readers rewound, producers that survive it).

The benchmark also kills vLLM's engine core, the generator, the judge and the gateway (`--targets`); in
the tests a dead vLLM's restart is tests/test_generator_server.py's, and the others' recovery is a plain
restart under odpo up's supervisor (tests/test_launcher.py). Each adds minutes here, not coverage.

The loop must go on after each kill, versions stay consecutive, the trainer's ledger shows no pair trained
twice, and the archive holds every pair the judge published except those the killed broker held.
"""

from __future__ import annotations

import pytest

from benchmarks.chaos import TARGETS, ChaosOptions, print_report, run

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


SHORT_TARGETS = ("trainer", "broker")  # in this order
assert set(SHORT_TARGETS) <= set(TARGETS)


def test_every_component_killed_in_turn_the_loop_goes_on(tmp_path, model_dir):
    report = run(ChaosOptions(out=tmp_path / "chaos", kills=len(SHORT_TARGETS), targets=SHORT_TARGETS,
                              interval_s=15, in_turn=True,
                              warmup_s=10, cooldown_s=45, drain_s=45, window_pairs=4, recover_timeout_s=420,
                              extra_env={"ODPO_BASE_MODEL": str(model_dir)}))
    print_report(report)
    assert [k["component"] for k in report["kills"]] == list(SHORT_TARGETS)
    assert report["kills_recovered"] == len(SHORT_TARGETS), report["kills"]
    assert len(report["versions"]) >= 2 and report["versions_consecutive"], report["versions"]
    assert report["pairs_trained_twice"] == 0, report["trained_twice_ids"]
    assert report["pairs_lost_otherwise"] == 0
    assert report["pairs_archived"] >= report["pairs_trained"] > 0
    assert report["client_requests_ok"] > 0 and report["pairs_per_s_after"] > 0

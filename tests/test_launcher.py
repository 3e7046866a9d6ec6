"""Supervision: a component that exits is restarted with backoff, restarts are counted, a crash loop stops the
run with the component's last log lines, components.json names every pid. The component is a tiny script
(`Launcher.command` is injectable), so this runs in a few seconds."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from service.launcher import ComponentDied, Launcher, RestartPolicy, RestartTracker

SCRIPT = """
import os, sys, time
mode = sys.argv[1]
print(f"{mode} starting, pid {os.getpid()}", flush=True)
if mode == "crash":
    print("boom: the component failed", flush=True)
    sys.exit(3)
if mode == "quit":
    sys.exit(0)
if mode == "engine":  # as the generator logs a vLLM death before it exits
    print("12:00:00 ERROR generator.service: exit cause: vLLM died (KeyError): KeyError: np.int64(6) at "
          "vllm/lora/punica_wrapper/utils.py:100 in convert_mapping", flush=True)
    print("Traceback (most recent call last): ...", flush=True)
    sys.exit(1)
time.sleep(600)
"""


def test_backoff_doubles_to_the_cap_and_resets_after_a_stable_run():
    t = RestartTracker(RestartPolicy(backoff_initial_s=1, backoff_max_s=30, stable_s=60, max_restarts=100,
                                     window_s=300))
    now, delays = 0.0, []
    for _ in range(7):
        now += 1
        delays.append(t.exited(now, ran_s=1))
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert t.exited(now + 100, ran_s=100) == 1, "a stable run starts the backoff again"
    assert t.exited(now + 101, ran_s=1) == 2


def test_crash_loop_is_more_exits_than_allowed_within_the_window():
    t = RestartTracker(RestartPolicy(max_restarts=5, window_s=300))
    assert all(t.exited(float(i), ran_s=1) is not None for i in range(5))
    assert t.exited(10.0, ran_s=1) is None, "the 6th exit within 300 s is a crash loop"
    t = RestartTracker(RestartPolicy(max_restarts=2, window_s=10))
    assert t.exited(0.0, 1) is not None and t.exited(5.0, 1) is not None
    assert t.exited(11.0, 1) is not None, "the exit at 0 s left the window"
    assert t.exited(12.0, 1) is None


def _launcher(tmp_path, policy, on_restart=None) -> Launcher:
    script = tmp_path / "component.py"
    script.write_text(SCRIPT)
    return Launcher(tmp_path / "logs", policy=policy, command=lambda component: [sys.executable, str(script), component],
                    state_file=tmp_path / "components.json", on_restart=on_restart)


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "components.json").read_text())


def test_a_crashing_component_is_restarted_with_backoff_then_stops_the_run(tmp_path):
    policy = RestartPolicy(backoff_initial_s=0.2, backoff_max_s=0.4, stable_s=30, max_restarts=3, window_s=60)
    restarted = []
    launcher = _launcher(tmp_path, policy, on_restart=restarted.append)
    try:
        launcher.start("crash", name="trainer")
        lines, exits, starts = [], [], []
        with pytest.raises(ComponentDied) as died:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                for line in launcher.supervise():
                    lines.append(line)
                    (exits if "exited" in line else starts).append(time.monotonic())
                    if "restarted" in line:
                        assert _state(tmp_path)["trainer"]["restarts"] == len(starts)
                time.sleep(0.01)
        text = str(died.value)
        assert "trainer crash loop: exited 4 times within 60s (last exit code 3)" in text
        assert "boom: the component failed" in text, "the last log lines come with the error"
        assert [line.split(";")[1].strip() for line in lines if "exited" in line] == [
            "restarting it in 0.2s", "restarting it in 0.4s", "restarting it in 0.4s"]
        assert all(line.startswith("trainer exited with code 3") for line in lines if "exited" in line)
        gaps = [s - e for e, s in zip(exits, starts)]
        assert [round(g, 1) >= d for g, d in zip(gaps, (0.2, 0.4, 0.4))] == [True] * 3, gaps
        assert restarted == ["trainer"] * 3 and launcher.restarts() == {"trainer": 3}
        assert (tmp_path / "logs" / "trainer.log").read_text().count("---- odpo up: restart") == 3
    finally:
        launcher.stop()


def test_kill_9_by_the_pid_in_components_json_restarts_it(tmp_path):
    launcher = _launcher(tmp_path, RestartPolicy(backoff_initial_s=0.1))
    try:
        launcher.start("sleep", name="generator")
        launcher.start("sleep", name="judge")
        before = _state(tmp_path)
        assert set(before) == {"generator", "judge"}
        assert before["generator"]["restarts"] == 0 and before["generator"]["status"] == "running"
        old = before["generator"]["pid"]
        os.kill(old, signal.SIGKILL)
        lines = []
        deadline = time.monotonic() + 20
        while not any("restarted" in line for line in lines) and time.monotonic() < deadline:
            lines += launcher.supervise()
            time.sleep(0.02)
        assert lines[0].startswith("generator exited with code -9"), lines
        after = _state(tmp_path)
        new = after["generator"]["pid"]
        assert new != old and after["generator"]["restarts"] == 1 and after["generator"]["status"] == "running"
        assert after["generator"]["started_at"] > before["generator"]["started_at"]
        os.kill(new, 0)  # alive
        assert after["judge"] == before["judge"], "the others are untouched"
        assert launcher.restarts() == {"generator": 1, "judge": 0}
        assert not list(tmp_path.glob(".components.json.tmp-*")), "written by write-to-temp and rename"
    finally:
        launcher.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(new, 0)


def test_any_exit_code_is_restarted_and_check_stays_strict(tmp_path):
    launcher = _launcher(tmp_path, RestartPolicy(backoff_initial_s=0.05))
    try:
        launcher.start("quit", name="gateway")
        deadline = time.monotonic() + 20
        lines = []
        while not any("restarted" in line for line in lines) and time.monotonic() < deadline:
            lines += launcher.supervise()
            time.sleep(0.02)
        assert lines[0].startswith("gateway exited with code 0"), lines
        time.sleep(0.5)
        with pytest.raises(ComponentDied, match="gateway exited with code 0"):
            launcher.check()  # tests that start components themselves want any exit to fail loudly
    finally:
        launcher.stop()


ORPHANS_DRIVER = """
import json, os, signal, sys, time
from pathlib import Path
from service.launcher import Launcher, RestartPolicy

tmp = Path(sys.argv[1])
component = tmp / "generator.py"
component.write_text('''
import subprocess, sys, time
# a child in a session of its own that outlives its parent, as vLLM's server and engine core under the generator
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[2] + ".tmp", "w").write(str(p.pid))
import os; os.replace(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(600)
''')
pid_file = tmp / "grandchild.pid"


def grandchild():
    deadline = time.monotonic() + 20
    while not pid_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    pid_file.unlink()
    return pid


def gone(pid, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while os.path.exists(f"/proc/{pid}"):  # a zombie still has its /proc entry: gone means reaped too
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


launcher = Launcher(tmp / "logs", policy=RestartPolicy(backoff_initial_s=0.1), adopt_orphans=True,
                    command=lambda c: [sys.executable, str(component), c, str(pid_file)])
child = launcher.start("generator")
first = grandchild()
os.kill(child.proc.pid, signal.SIGKILL)
lines = []
while not any("restarted" in line for line in lines):
    lines += launcher.supervise()
    time.sleep(0.05)
second = grandchild()
first_gone = gone(first)
second_alive = os.path.exists(f"/proc/{second}")
launcher.stop()
print(json.dumps({"subreaper": launcher.adopt_orphans, "first_gone": first_gone, "second_alive": second_alive,
                  "second_gone_after_stop": gone(second)}))
"""


def test_what_a_killed_component_leaves_running_is_killed_and_reaped(tmp_path):
    """Run in a process of its own: a subreaper adopts every orphan of its descendants, which a test process with
    fixtures of its own must not."""
    import subprocess

    driver = tmp_path / "driver.py"
    driver.write_text(ORPHANS_DRIVER)
    r = subprocess.run([sys.executable, str(driver), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == {"subreaper": True, "first_gone": True, "second_alive": True,
                                                     "second_gone_after_stop": True}


def test_the_reason_a_component_logged_is_on_its_exit_line_and_counts_an_engine_crash(tmp_path):
    from service.up_metrics import UpMetrics

    metrics = UpMetrics(["generator"])
    policy = RestartPolicy(backoff_initial_s=0.2, backoff_max_s=0.4, stable_s=30, max_restarts=5, window_s=60)
    launcher = _launcher(tmp_path, policy)
    launcher.on_exit_cause = metrics.exit_cause
    try:
        launcher.start("engine", name="generator")
        exits = []
        deadline = time.monotonic() + 30
        while len(exits) < 2 and time.monotonic() < deadline:
            exits += [line for line in launcher.supervise() if "exited" in line]
            time.sleep(0.01)
        assert exits[0] == ("generator exited with code 1 after 0s (vLLM died (KeyError): KeyError: np.int64(6) at "
                            "vllm/lora/punica_wrapper/utils.py:100 in convert_mapping); restarting it in 0.2s")
        assert metrics.engine_crashes.labels("KeyError")._value.get() == 2
    finally:
        launcher.stop()

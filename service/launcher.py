"""Starts component processes (`odpo <component>`), restarts the ones that exit, and makes sure none outlives us.

Each child runs the same code as the separate command, in its own process
group, logs to a file, and gets SIGKILL if this process dies (PR_SET_PDEATHSIG).
`supervise()` restarts a child that exited (any code, a kill -9 included) after
an exponential backoff, counts its restarts, and raises `ComponentDied` on a
crash loop (more exits than `RestartPolicy.max_restarts` within `window_s`).
`check()` is the strict variant for tests: any exit is an error.
`stop()` sends SIGTERM (components shut down cleanly), then SIGKILL to the
whole group after a grace period, which also reaps vLLM's worker processes.

With `adopt_orphans` (odpo up) this process becomes a child subreaper: what a
dead component leaves running in a session of its own (vLLM's API server and
engine core, when the generator is killed) is re-parented here instead of to
init, and is killed and reaped, so days of restarts do not pile up orphans.
Any child of this process that is not a component (or in `keep_pids`, e.g.
the broker) counts as such an orphan.

With a `state_file` the launcher keeps `components.json` there, rewritten
atomically on every (re)start and exit, so an outside tool (a chaos test, an
operator) can find and kill a component by pid: name -> {pid, restarts,
started_at (unix time), status ("running" or "restarting": then pid is the
exited process's), last_exit_code, log}.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.adapter_store import write_file_atomic
from core.runtime import EXIT_CAUSE, die_with_parent


class ComponentDied(RuntimeError):
    pass


@dataclass(frozen=True)
class RestartPolicy:
    """When an exited process is started again, and when its exits are a crash loop that ends the run."""

    backoff_initial_s: float = 1.0  # first delay; it doubles with each exit ...
    backoff_max_s: float = 30.0  # ... up to this
    stable_s: float = 60.0  # a process that ran this long before it exited starts again from the first delay
    max_restarts: int = 5  # more exits than this within window_s: a crash loop
    window_s: float = 300.0


class RestartTracker:
    """Backoff and crash-loop bookkeeping of one supervised process (a component or the broker)."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self.restarts = 0
        self._delay = policy.backoff_initial_s
        self._exits: deque[float] = deque()

    def exited(self, now: float, ran_s: float) -> float | None:
        """Record an exit after `ran_s` seconds of running: the delay before the restart, None for a crash loop."""
        p = self.policy
        self._exits.append(now)
        while now - self._exits[0] > p.window_s:
            self._exits.popleft()
        if len(self._exits) > p.max_restarts:
            return None
        if ran_s >= p.stable_s:
            self._delay = p.backoff_initial_s
        delay, self._delay = self._delay, min(self._delay * 2, p.backoff_max_s)
        return delay

    def crash_loop_text(self, name: str) -> str:
        return f"{name} crash loop: exited {len(self._exits)} times within {self.policy.window_s:.0f}s"


def odpo_command(component: str) -> list[str]:
    """The command line of `odpo <component>` with this interpreter."""
    return [sys.executable, "-m", "service.cli", component]


@dataclass
class Child:
    name: str
    component: str
    extra_env: dict[str, str]
    proc: subprocess.Popen
    log_path: Path
    tracker: RestartTracker
    started_at: float = field(default_factory=time.time)  # wall clock, for components.json
    started_mono: float = field(default_factory=time.monotonic)
    restart_at: float | None = None  # monotonic time of a pending restart
    last_code: int | None = None

    @property
    def restarts(self) -> int:
        return self.tracker.restarts

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def exit_cause(self) -> str | None:
        """The reason the process logged for exiting (a line with `EXIT_CAUSE`) in its last lines, if any."""
        for line in reversed(self.tail(60).splitlines()):
            if EXIT_CAUSE in line:
                return line.split(EXIT_CAUSE, 1)[1].strip()[:300]
            if line.startswith("---- odpo up: restart"):
                break  # an earlier run's reason
        return None

    def state(self) -> dict:
        waiting = self.restart_at is not None  # then `pid` is the exited process's
        return {"pid": self.proc.pid, "restarts": self.restarts, "started_at": self.started_at,
                "status": "restarting" if waiting else "running", "last_exit_code": self.last_code,
                "log": str(self.log_path)}


@dataclass
class Launcher:
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    command: Callable[[str], list[str]] = odpo_command  # injectable: tests run a tiny script instead
    state_file: Path | None = None  # components.json
    on_restart: Callable[[str], None] | None = None  # called with the name after every restart (a metric)
    on_exit_cause: Callable[[str, str], None] | None = None  # (name, the reason it logged) when one exits
    extra_state: dict[str, dict] = field(default_factory=dict)  # more entries of components.json (the broker)
    adopt_orphans: bool = False  # become a subreaper; kill and reap what dead components leave behind
    keep_pids: Callable[[], set[int]] = set  # children of this process that are not orphans (the broker)

    def __post_init__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.adopt_orphans:
            self.adopt_orphans = become_subreaper()
        atexit.register(self.stop)

    def start(self, component: str, extra_env: dict[str, str] | None = None, name: str | None = None) -> Child:
        """Run `odpo <component>`; `name` (default: the component) names its log file and its errors."""
        name = name or component
        extra_env = dict(extra_env or {})
        log_path = self.log_dir / f"{name}.log"
        child = Child(name, component, extra_env, self._spawn(component, extra_env, log_path), log_path,
                      RestartTracker(self.policy))
        self.children.append(child)
        self.write_state()
        return child

    def _spawn(self, component: str, extra_env: dict[str, str], log_path: Path) -> subprocess.Popen:
        env = {**os.environ, **self.env, **extra_env}
        with open(log_path, "ab") as log:
            return subprocess.Popen(self.command(component), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)

    def check(self) -> None:
        """Raise if a component exited on its own (no restarts: for tests that start components themselves)."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise ComponentDied(f"{c.name} exited with code {code}; last log lines:\n{c.tail()}")

    def supervise(self) -> list[str]:
        """Restart exited components once their backoff is over; returns lines saying what happened.

        Raises `ComponentDied` (with the component's last log lines) on a crash loop."""
        lines = []
        self.reap_orphans()
        for c in self.children:
            now = time.monotonic()
            if c.restart_at is None:
                code = c.proc.poll()
                if code is None:
                    continue
                _signal_group(c.proc, signal.SIGKILL)  # what it leaves behind (vLLM's engine) goes with it
                ran_s = now - c.started_mono
                delay = c.tracker.exited(now, ran_s)
                if delay is None:
                    raise ComponentDied(f"{c.tracker.crash_loop_text(c.name)} (last exit code {code}); "
                                        f"last log lines:\n{c.tail()}")
                c.restart_at, c.last_code = now + delay, code
                cause = c.exit_cause()
                if cause and self.on_exit_cause:
                    self.on_exit_cause(c.name, cause)
                lines.append(f"{c.name} exited with code {code} after {ran_s:.0f}s"
                             f"{f' ({cause})' if cause else ''}; restarting it in {delay:.3g}s")
                self.write_state()
            if now >= c.restart_at:
                lines.append(self._restart(c))
        return lines

    def _restart(self, c: Child) -> str:
        with open(c.log_path, "a") as log:
            log.write(f"\n---- odpo up: restart {c.restarts + 1} of {c.name} at {time.strftime('%H:%M:%S')} "
                      f"(it exited with code {c.last_code}) ----\n")
        c.proc = self._spawn(c.component, c.extra_env, c.log_path)
        c.tracker.restarts += 1
        c.restart_at, c.started_at, c.started_mono = None, time.time(), time.monotonic()
        self.write_state()
        if self.on_restart:
            self.on_restart(c.name)
        return f"{c.name} restarted (restart {c.restarts}, pid {c.proc.pid})"

    def reap_orphans(self) -> list[int]:
        """Kill (with their process groups) and reap the processes re-parented to us; returns their pids."""
        if not self.adopt_orphans:
            return []
        ours = {c.proc.pid for c in self.children} | set(self.keep_pids())
        orphans = [pid for pid in child_pids(os.getpid()) if pid not in ours]
        for pid in orphans:
            for kill in (os.killpg, os.kill):  # the group, when it leads one (vLLM's server and engine)
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.waitpid(pid, os.WNOHANG)  # reaped now if it is gone, else on a later call
            except ChildProcessError:
                pass
        return orphans

    def restarts(self) -> dict[str, int]:
        return {c.name: c.restarts for c in self.children}

    def write_state(self) -> None:
        """Rewrite components.json at once (an outside reader never sees half a file)."""
        if self.state_file is None:
            return
        state = {c.name: c.state() for c in self.children} | self.extra_state
        write_file_atomic(self.state_file, (json.dumps(state, indent=2) + "\n").encode())

    def stop(self, grace_s: float = 20.0, last: tuple[str, ...] = (), settle_s: float = 3.0) -> None:
        """SIGTERM every component, those named in `last` only once the others have exited and `settle_s`
        has passed (the trainer last: it takes and archives the pairs the judge published on its way out)."""
        first = [c for c in self.children if c.proc.poll() is None and c.name not in last]
        self._terminate(first, grace_s)
        rest = [c for c in self.children if c.proc.poll() is None and c.name in last]
        if first and rest:
            time.sleep(settle_s)
        self._terminate(rest, grace_s)
        for c in self.children:  # the group too: vLLM's engine and workers are grandchildren
            _signal_group(c.proc, signal.SIGKILL)
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()
        deadline = time.monotonic() + 5
        while self.reap_orphans() and time.monotonic() < deadline:
            time.sleep(0.1)


    @staticmethod
    def _terminate(children: list[Child], grace_s: float) -> None:
        for c in children:
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in children:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants are re-parented to this process (Linux; False elsewhere)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except OSError:
        return False


def child_pids(parent: int) -> list[int]:
    """The pids whose parent is `parent` (from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

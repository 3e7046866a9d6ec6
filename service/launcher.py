"""Starts component processes (`odpo <component>`) and makes sure none outlives us.

Each child runs the same code as the separate command, in its own process
group, logs to a file, and gets SIGKILL if this process dies (PR_SET_PDEATHSIG).
`stop()` sends SIGTERM (components shut down cleanly), then SIGKILL to the
whole group after a grace period, which also reaps vLLM's worker processes.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.runtime import die_with_parent


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ComponentDied(RuntimeError):
    pass


@dataclass
class Launcher:
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def __post_init__(self):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)

    def start(self, component: str, extra_env: dict[str, str] | None = None, name: str | None = None) -> Child:
        """Run `odpo <component>`; `name` (default: the component) names its log file and its errors."""
        name = name or component
        env = {**os.environ, **self.env, **(extra_env or {})}
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", component], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=die_with_parent)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise if a component exited on its own."""
        for c in self.children:
            code = c.proc.poll()
            if code is not None:
                raise ComponentDied(f"{c.name} exited with code {code}; last log lines:\n{c.tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        alive = [c for c in self.children if c.proc.poll() is None]
        for c in alive:
            _signal_group(c.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in alive:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children:  # the group too: vLLM's engine and workers are grandchildren
            _signal_group(c.proc, signal.SIGKILL)
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

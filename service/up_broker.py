"""`odpo up` keeps its embedded broker alive: a broker that dies is started again on the same address.

The broker is memory-only, so a restarted one is empty: its topics are
recreated (`core.bus.ensure_topics`) and whatever it held is gone. The
components reconnect by themselves (and are restarted by the launcher if they
crash over it); `odpo up` itself rewinds its topic watcher and forgets the
prompts that were waiting in the old broker (`on_down`, `on_up`). Restarts
follow the same backoff and crash-loop rule as the components.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from core.broker import EmbeddedBroker
from core.bus import ensure_topics
from service.launcher import ComponentDied, RestartPolicy, RestartTracker

NAME = "broker"


class BrokerKeeper:
    def __init__(self, broker: EmbeddedBroker, policy: RestartPolicy,
                 on_down: Callable[[], str | None] = lambda: None, on_up: Callable[[], str | None] = lambda: None,
                 on_restart: Callable[[str], None] | None = None):
        """`on_down` runs when the broker is found dead (before the restart), `on_up` after it is back with its
        topics; a line either returns is reported with the restart's."""
        self.broker, self.tracker = broker, RestartTracker(policy)
        self.on_down, self.on_up, self.on_restart = on_down, on_up, on_restart
        self.started_at, self._started_mono = time.time(), time.monotonic()
        self.restart_at: float | None = None  # monotonic time of a pending restart; None while it runs
        self.last_code: int | None = None
        self._pid: int | None = broker.pid

    @property
    def up(self) -> bool:
        return self.restart_at is None

    @property
    def restarts(self) -> int:
        return self.tracker.restarts

    def check(self) -> list[str]:
        """Notice a dead broker and restart it once its backoff is over; lines saying what happened.

        Raises `ComponentDied` on a crash loop."""
        now = time.monotonic()
        if self.restart_at is None:
            if self.broker.running:
                return []
            self.last_code = self.broker.exit_code
            lines = [self._exited(now, f"the broker exited with code {self.last_code}")]
            lines += filter(None, [self.on_down()])
        else:
            lines = []
        if now >= self.restart_at:
            lines.append(self._restart())
        return lines

    def _exited(self, now: float, what: str) -> str:
        ran_s = now - self._started_mono
        delay = self.tracker.exited(now, ran_s)
        if delay is None:
            raise ComponentDied(f"{self.tracker.crash_loop_text(NAME)} (last exit code {self.last_code}); "
                                f"last log lines:\n{self.tail()}")
        self.restart_at = now + delay
        return f"{what} after {ran_s:.0f}s; restarting it on {self.broker.bootstrap} in {delay:.3g}s"

    def _restart(self) -> str:
        try:
            self.broker.start()
            ensure_topics(self.broker.bootstrap)
        except Exception as exc:  # noqa: BLE001 - any failure to come back is one more exit
            self.broker.stop()
            self.last_code = None
            self._started_mono = time.monotonic()
            return self._exited(time.monotonic(), f"the broker did not come back ({exc})")
        self.restart_at = None
        self.tracker.restarts += 1
        self.started_at, self._started_mono = time.time(), time.monotonic()
        if self.on_restart:
            self.on_restart(NAME)
        line = (f"broker restarted on {self.broker.bootstrap} (restart {self.restarts}, pid {self.broker.pid}); "
                "it starts empty: what the old one held is lost")
        more = self.on_up()
        return f"{line}; {more}" if more else line

    def state(self) -> dict:
        self._pid = self.broker.pid or self._pid  # the last one, while restarting
        return {"pid": self._pid, "restarts": self.restarts, "started_at": self.started_at,
                "status": "running" if self.up else "restarting", "last_exit_code": self.last_code,
                "log": str(self.broker.log_file) if self.broker.log_file else None}

    def tail(self, lines: int = 20) -> str:
        path: Path | None = self.broker.log_file
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
        except OSError:
            return ""

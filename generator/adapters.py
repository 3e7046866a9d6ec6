"""Hot swap of policy versions in a running vLLM server, and which names it keeps registered.

Each version N is loaded under its own name `policy-vN` (never in place:
vLLM can serve stale prefix-cache blocks for a reused name) after its sha256
and base model are checked. New samples go to the newest version at once.
`base` is the zero adapter, never the plain model (vLLM's CPU LoRA path
computes plain-model requests batched with LoRA ones with a LoRA applied).
A failed swap leaves the previous version serving.

No name is unloaded while it can still be asked for. vLLM 0.32 hashes a
LoRARequest by its name: a name unloaded while a request on it runs and then
registered again (the store resolver on the next request for it, or a
gateway's load) gets a second int id; a batch that holds both ids activates
one of them (the set drops the other), and once vLLM's LRU moves the other out
of its slot the worker dies with `KeyError` in `convert_mapping`
(tests/test_generator_unload_race.py reproduces it). Counting requests in
flight cannot prevent it: the gateway, the gate and the resolver use the same
engine. So a name keeps its one id for as long as a load of it could succeed,
and the only unload is of a version whose folder has left the store
(`forget_deleted`: retention deleted it, and version numbers never come back,
so no later load can register that name again). What vLLM holds in memory is
bounded by its own LRU: `--max-loras` adapters in a batch, `--max-cpu-loras`
in memory. Each engine step activates the adapters its batch uses; one that
a load between steps pushed out of memory is read from disk again, so
`max_cpu_loras` above `max_loras` leaves room for loads without that.
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

from generator.metrics import LOADED_VERSIONS, POLICY_VERSION, SWAP_FAILURES, SWAP_LATENCY, UNLOADS
from core.adapter_store import adapter_digest, published_versions
from core.assets import base_model_name
from core.contracts import BASE_MODEL_NAME, AdapterReady, parse_version_name, version_name

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


class AdapterManager:
    """Which adapters this generator registered in vLLM, which one is current, and which names may go."""

    def __init__(self, client: httpx.Client, store: Path, model_dir: Path):
        self.client = client
        self.store = Path(store).resolve()
        self.base_model = base_model_name(Path(model_dir))
        self._served: dict[str, _Served] = {}
        self._current: _Served | None = None
        self._state = threading.Lock()  # guards _served/_current; never held over HTTP
        self._swap = threading.Lock()  # one load or unload at a time

    # -- state ---------------------------------------------------------------------------------------
    @property
    def current_version(self) -> int:
        return self._current.version if self._current else -1

    @property
    def current_name(self) -> str | None:
        return self._current.name if self._current else None

    def loaded_versions(self) -> list[int]:
        """Versions this manager registered in vLLM and has not unloaded (0 = base), ascending."""
        with self._state:
            return sorted(s.version for s in self._served.values())

    @contextmanager
    def using(self, name: str | None = None) -> Iterator[tuple[str, int]]:
        """The version (default: the current one) one request goes to; yields (name, version)."""
        with self._state:
            served = self._current if name is None else self._served.get(name)
        if served is None:
            raise KeyError(f"{name or 'no version'} is not being served")
        yield served.name, served.version

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
            latency = max(0.0, time.time() - ready.created_at)
            SWAP_LATENCY.observe(latency)
            POLICY_VERSION.set(ready.version)
            log.info("serving %s (%.3fs after it was published)", name, latency)
        return True

    def resync(self) -> list[str]:
        """Load again every name the server has lost (it restarted); returns those names. A name whose files
        are gone is forgotten (the resolver does not serve it either); the current one is kept and retried."""
        with self._swap:
            present = self._served_models()
            with self._state:
                missing = [s for s in self._served.values() if s.name not in present]
            done = []
            for s in missing:
                try:
                    self._load(s.name, s.path, kind="resync")
                except AdapterRejected as exc:
                    SWAP_FAILURES.labels(exc.kind).inc()
                    log.error("could not re-register %s: %s", s.name, exc.reason)
                    with self._state:
                        if s is not self._current and s.version > 0:
                            self._served.pop(s.name, None)
                    continue
                log.warning("re-registered %s after a vLLM restart", s.name)
                done.append(s.name)
            return done

    def forget_deleted(self) -> list[str]:
        """Unload every `policy-v<N>` vLLM lists whose folder the store no longer holds; returns those names.

        Only such a name is safe to unload (module docstring): no load of it can succeed again, so it never
        comes back under a second id beside requests still running on the first. A store that lists no
        version (unmounted, emptied) is not read as "everything was deleted", and the store's newest version
        and newer ones are never unloaded. Sets the loaded-versions gauge from vLLM's own list.
        """
        with self._swap:
            listed = self._served_models()
            try:
                stored = set(published_versions(self.store))
            except OSError as exc:
                log.warning("not unloading deleted versions: cannot read the adapter store %s: %s", self.store, exc)
                return []
            policies = {n: v for n, v in ((n, parse_version_name(n)) for n in listed) if v is not None and v > 0}
            newest = max(stored, default=0)  # 0: an empty store unloads nothing
            gone = sorted((n for n, v in policies.items() if v < newest and v not in stored), key=policies.__getitem__)
            for name in gone:
                self._unload(name)
                with self._state:
                    self._served.pop(name, None)
            LOADED_VERSIONS.set(len(policies) - len(gone))
            return gone

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

    def _unload(self, name: str) -> None:
        try:
            resp = self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:  # a restarted server has lost it anyway; the next check tries again
            log.warning("unloading %s failed: %s", name, exc)
            return
        if resp.status_code in (200, 404):
            UNLOADS.inc()
            log.info("unloaded %s: its folder left the adapter store", name)
        else:
            log.warning("unloading %s: HTTP %d %s", name, resp.status_code, resp.text[:200])

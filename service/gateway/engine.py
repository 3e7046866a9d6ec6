"""The serving engine as the gateway sees it: which versions it lists, what a model name resolves to.

The generator loads each new version into vLLM and unloads old ones beyond
its `keep_versions`. The gateway may need a version the generator no longer
keeps (the promoted one when newer ones were refused, a rollback target, one
to score). `EngineAdapters` then loads it from the adapter store under its
own name `policy-v<N>` after checking its sha256, and unloads it when it is
neither promoted nor being scored. It never touches names the generator
loaded, so a version the generator samples from is never pulled away.
`base` (the zero adapter) is registered by the generator only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import anyio
import httpx

from service.adapter_store import adapter_digest
from service.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name, version_name
from service.gateway.book import VersionBook, VersionRecord

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """The requested model name is not served."""


class NotServable(Exception):
    """A version that cannot be loaded into the engine."""


class PolicyUnavailable(Exception):
    """The promoted version is neither served nor loadable right now."""


def listed_versions(payload: dict) -> set[int]:
    names = (m.get("id", "") for m in payload.get("data", []) if isinstance(m, dict))
    return {v for v in map(parse_version_name, names) if v is not None}


class EngineAdapters:
    """Loads versions the gateway needs and the generator does not serve (blocking; call from threads)."""

    def __init__(self, vllm_url: str, store_dir: Path, timeout_s: float = 30.0):
        self.client = httpx.Client(base_url=vllm_url, timeout=timeout_s)
        self.store = Path(store_dir).expanduser().resolve()
        self.owned: set[int] = set()
        self.changes = 0  # bumped by every load/unload, so cached listings know they are stale
        self._lock = threading.Lock()  # one load/unload at a time

    def listed(self) -> set[int]:
        resp = self.client.get("/v1/models")
        resp.raise_for_status()
        return listed_versions(resp.json())

    def wait_listed(self, version: int, timeout_s: float, halt: threading.Event) -> bool:
        """Wait for the generator to load `version`; True once the engine lists it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if version in self.listed():
                return True
            if time.monotonic() >= deadline or halt.is_set():
                return False
            halt.wait(0.5)

    def ensure(self, rec: VersionRecord) -> None:
        """Make the engine serve `rec.version`; raises NotServable, or httpx errors when it is unreachable."""
        with self._lock:
            if rec.version in self.listed():
                return
            if rec.version == 0:
                raise NotServable(f"`{BASE_MODEL_NAME}` is not loaded yet (the generator registers it)")
            name = version_name(rec.version)
            if not rec.path or not rec.sha256:
                raise NotServable(f"{name} has no adapter path")
            folder = (self.store / rec.path).resolve()
            if not folder.is_relative_to(self.store):
                raise NotServable(f"{rec.path} is outside the adapter store")
            try:
                digest = adapter_digest(folder)
            except OSError as exc:
                raise NotServable(f"cannot read {folder}: {exc}") from exc
            if digest != rec.sha256:
                raise NotServable(f"sha256 mismatch for {folder}")
            resp = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            if resp.status_code != 200 and not (resp.status_code == 400 and "already been loaded" in resp.text):
                raise NotServable(f"the engine refused to load {name}: HTTP {resp.status_code} {resp.text[:300]}")
            self.owned.add(rec.version)
            self.changes += 1
            log.info("loaded %s from %s (the generator does not serve it)", name, folder)

    def release(self, keep: set[int]) -> None:
        """Unload the versions this gateway loaded that are not in `keep`."""
        with self._lock:
            for version in sorted(self.owned - keep):
                self.owned.discard(version)
                self.changes += 1
                try:
                    resp = self.client.post("/v1/unload_lora_adapter", json={"lora_name": version_name(version)})
                    log.info("unloaded %s: HTTP %d", version_name(version), resp.status_code)
                except httpx.HTTPError as exc:
                    log.warning("unloading %s failed: %s", version_name(version), exc)

    def close(self) -> None:
        self.client.close()


class ModelRouter:
    """Resolves requested model names to served names, from a cached listing of the engine's models."""

    def __init__(self, client: httpx.AsyncClient, book: VersionBook, adapters: EngineAdapters, refresh_s: float):
        self.client, self.book, self.adapters, self.refresh_s = client, book, adapters, refresh_s
        self._listed: set[int] = set()
        self._fetched_at = float("-inf")
        self._seen_changes = -1
        self._lock = asyncio.Lock()

    async def listed(self, force: bool = False) -> set[int]:
        """Versions the engine serves (0 = `base`); raises httpx errors when it is unreachable."""
        async with self._lock:
            expired = time.monotonic() - self._fetched_at > self.refresh_s
            if force or expired or self._seen_changes != self.adapters.changes:
                changes = self.adapters.changes
                resp = await self.client.get("/v1/models")
                resp.raise_for_status()
                self._listed = listed_versions(resp.json())
                self._fetched_at, self._seen_changes = time.monotonic(), changes
            return set(self._listed)

    async def resolve(self, requested: str) -> tuple[str, int]:
        """(served name, version) for `policy`, `base` or `policy-v<N>`."""
        if requested == POLICY_ALIAS:
            version = self.book.promoted
            await self.make_servable(version)
            return version_name(version), version
        version = parse_version_name(requested)
        if version is None:
            raise UnknownModel(f"unknown model `{requested}`; use `{POLICY_ALIAS}`, `{BASE_MODEL_NAME}` or "
                               "`policy-v<N>`")
        if version not in await self.listed() and version not in await self.listed(force=True):
            raise UnknownModel(f"model `{requested}` is not loaded")
        return requested, version

    async def make_servable(self, version: int, force: bool = False) -> None:
        """Load `version` if the engine lost it (the generator unloaded it); raises PolicyUnavailable if not.

        `force` re-reads the listing first (the engine just answered 404 for it).
        """
        if version in await self.listed(force):
            return
        rec = self.book.record(version)
        if rec is None:
            raise PolicyUnavailable(f"{version_name(version)} is unknown")
        try:
            await anyio.to_thread.run_sync(self.adapters.ensure, rec)
        except NotServable as exc:
            raise PolicyUnavailable(f"the promoted version cannot be served: {exc}") from exc
        await self.listed(force=True)

"""The serving engines as the gateway sees them: which versions they list, what a model name resolves to.

The generator loads each new version into its vLLM; every vLLM replica also
serves any announced version on first request (generator/lora_resolver.py).
The gateway may need a version that an engine does not list: one to score,
the promoted one, a rollback target. `EngineAdapters` then loads it into
every engine that lacks it, from the adapter store under its own name
`policy-v<N>` after checking its sha256 (also for a vLLM without the
resolver). The gateway never unloads: a name unloaded while anyone's request
on it runs, then loaded again, crashes vLLM (generator/adapters.py explains);
each engine's generator unloads only the names of versions retention deleted,
and vLLM's own LRU bounds what it keeps in memory. `base` (the zero adapter)
is registered by the generators only.

A version becomes `policy` only once every routable engine serves it
(`make_servable(..., everywhere=True)` before the gate scores it and before
an operator's promote, pin or rollback).

A client's `policy-v<N>` that no engine serves and the store has not
announced is answered from a short negative cache (`unknown_cache_s`), and
the engines' listings are re-read for such names at most once per that time:
a stream of unknown names neither reads the store again for the same name nor
refreshes every engine under the router's lock. Versions the gate refused or
an operator rolled back are not served by name unless `serve_refused` (the
gateway's `serve_refused_versions`); `policy` follows the gate either way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from pathlib import Path

import anyio
import httpx

from core.adapter_store import AdapterFolderError, read_manifest, verified_folder
from core.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name, version_name
from service.registry.book import REFUSED, ROLLED_BACK, VersionBook, VersionRecord
from service.gateway.endpoints import EnginePool

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    """The requested model name is not served."""


class NotServable(Exception):
    """A version that cannot be loaded into the engine."""


class PolicyUnavailable(Exception):
    """The promoted version is neither served nor loadable right now."""


# vLLM answers the requests in flight when its engine core dies with HTTP 500 and this in the body, then exits.
_ENGINE_DEAD_MARKS = (b"EngineDeadError", b"EngineCore encountered an issue")


def engine_died(content: bytes) -> bool:
    """Whether an engine's 5xx body says its engine core died (not an error about the request itself)."""
    return any(mark in content for mark in _ENGINE_DEAD_MARKS)


def listed_versions(payload: dict) -> set[int]:
    names = (m.get("id", "") for m in payload.get("data", []) if isinstance(m, dict))
    return {v for v in map(parse_version_name, names) if v is not None}


class EngineAdapters:
    """Loads versions the gateway needs into every engine (blocking; call from threads)."""

    def __init__(self, pool: EnginePool, store_dir: Path, timeout_s: float = 30.0,
                 headers: dict[str, str] | None = None):
        self.pool = pool
        self.headers = dict(headers or {})  # vLLM's API key (Authorization), on every request to an engine
        self.store = Path(store_dir).expanduser().resolve()
        self.timeout_s = timeout_s
        self.changes = 0  # bumped by every load, so cached listings know they are stale
        self._clients: dict[str, httpx.Client] = {}
        self._lock = threading.Lock()  # one load at a time

    def client(self, url: str) -> httpx.Client:
        if url not in self._clients:
            self._clients[url] = httpx.Client(base_url=url, timeout=self.timeout_s, headers=self.headers)
        return self._clients[url]

    def listed_at(self, url: str) -> set[int]:
        try:
            resp = self.client(url).get("/v1/models")
        except httpx.TransportError as exc:
            self.pool.mark_down(url, exc.__class__.__name__)
            raise
        resp.raise_for_status()
        self.pool.mark_up(url)
        return listed_versions(resp.json())

    def listings(self) -> dict[str, set[int]]:
        """What each reachable engine lists; raises the last transport error when none answers."""
        found, error = {}, None
        for url in self.pool.routable():
            try:
                found[url] = self.listed_at(url)
            except httpx.TransportError as exc:
                error = exc
        if not found and error is not None:
            raise error
        return found

    def listed(self) -> set[int]:
        """Versions every reachable engine lists (0 = `base`)."""
        listings = list(self.listings().values())
        return set.intersection(*listings) if listings else set()

    def scoring_url(self) -> str:
        """An engine to score on (they all serve the same weights): the first that answers."""
        return next(iter(self.listings()))

    def wait_listed(self, version: int, timeout_s: float, halt: threading.Event) -> bool:
        """Wait for the generators to load `version`; True once every reachable engine lists it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if version in self.listed():
                return True
            if time.monotonic() >= deadline or halt.is_set():
                return False
            halt.wait(0.5)

    def ensure(self, rec: VersionRecord) -> None:
        """Make every reachable engine serve `rec.version`; raises NotServable, or httpx errors when none
        is reachable. An engine that is down now serves it on first request when it is back (resolver)."""
        with self._lock:
            listings = self.listings()
            missing = [url for url, listed in listings.items() if rec.version not in listed]
            if not missing:
                return
            if rec.version == 0:
                raise NotServable(f"`{BASE_MODEL_NAME}` is not loaded yet (the generator registers it)")
            folder = self._checked_folder(rec)
            for url in missing:
                self._load(url, rec.version, folder)

    def ensure_at(self, url: str, rec: VersionRecord) -> None:
        """Make the engine at `url` serve `rec.version` (it answered 404 for it)."""
        with self._lock:
            if rec.version not in self.listed_at(url):
                if rec.version == 0:
                    raise NotServable(f"`{BASE_MODEL_NAME}` is not loaded yet at {url}")
                self._load(url, rec.version, self._checked_folder(rec))

    def _checked_folder(self, rec: VersionRecord) -> Path:
        if not rec.path or not rec.sha256:
            raise NotServable(f"{version_name(rec.version)} has no adapter path")
        try:
            return verified_folder(self.store, rec.path, rec.sha256)
        except AdapterFolderError as exc:
            raise NotServable(str(exc)) from exc

    def _load(self, url: str, version: int, folder: Path) -> None:
        name = version_name(version)
        resp = self.client(url).post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
        if resp.status_code != 200 and not (resp.status_code == 400 and "already been loaded" in resp.text):
            raise NotServable(f"{url} refused to load {name}: HTTP {resp.status_code} {resp.text[:300]}")
        self.changes += 1
        log.info("loaded %s into %s from %s (its generator does not serve it)", name, url, folder)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


class ModelRouter:
    """Resolves requested model names to served names, from cached listings of the engines' models."""

    UNKNOWN_KEPT = 4096  # names in the negative cache

    def __init__(self, clients: EngineClients, book: VersionBook, adapters: EngineAdapters, refresh_s: float,
                 unknown_cache_s: float = 0.0, serve_refused: bool = True):
        self.clients, self.book, self.adapters, self.refresh_s = clients, book, adapters, refresh_s
        self.unknown_cache_s, self.serve_refused = unknown_cache_s, serve_refused
        self.pool = adapters.pool
        self._unknown: collections.OrderedDict[int, float] = collections.OrderedDict()  # version -> until
        self._forced_at = float("-inf")  # the last re-read of the listings for an unknown name
        self._listed: dict[str, set[int]] = {}
        self._fetched_at: dict[str, float] = {}
        self._seen_changes = -1
        self._lock = asyncio.Lock()

    async def listings(self, force: bool = False) -> dict[str, set[int]]:
        """What each routable engine lists; raises an httpx error when none answers."""
        async with self._lock:
            changed = self._seen_changes != self.adapters.changes
            self._seen_changes = self.adapters.changes
            urls = await self.routable()
            stale = [u for u in urls if force or changed or time.monotonic() - self._fetched_at.get(u, -1e9)
                     > self.refresh_s]
            errors = await asyncio.gather(*(self._fetch(u) for u in stale))
            found = {u: set(self._listed[u]) for u in urls if u in self._fetched_at}
            if not found:
                raise next((e for e in errors if e is not None), httpx.ConnectError("no serving engine"))
            return found

    async def routable(self) -> list[str]:
        """The pool's routable engines."""
        await self._resolve_names()
        return self.pool.routable()

    async def rotation(self) -> list[str]:
        """The routable engines in the order one request tries them (round-robin)."""
        await self._resolve_names()
        return self.pool.rotation()

    async def _resolve_names(self) -> None:
        """Re-read the engines' addresses when due, off the event loop (a blocking DNS call)."""
        if self.pool.dns_due():
            await anyio.to_thread.run_sync(self.pool.urls)

    async def _fetch(self, url: str) -> Exception | None:
        try:
            resp = await self.clients.get(url).get("/v1/models")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TransportError):
                self.pool.mark_down(url, exc.__class__.__name__)
            self._fetched_at.pop(url, None)
            return exc
        self.pool.mark_up(url)
        self._listed[url], self._fetched_at[url] = listed_versions(resp.json()), time.monotonic()
        return None

    async def listed(self, force: bool = False) -> set[int]:
        """Versions some engine serves (0 = `base`); raises httpx errors when none is reachable."""
        return set().union(*(await self.listings(force)).values())

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
        if not self.serve_refused and version != self.book.promoted:
            status = self.book.status_of(version)
            if status in (REFUSED, ROLLED_BACK):
                what = "the gate refused it" if status == REFUSED else "an operator rolled it back"
                raise UnknownModel(f"model `{requested}` is not served: {what} (ODPO_GATEWAY_SERVE_REFUSED_VERSIONS)")
        if self._known_unknown(version):
            raise UnknownModel(f"model `{requested}` is not loaded")
        if version in await self.listed() or self.record(version) is not None:
            return requested, version
        if time.monotonic() - self._forced_at >= self.unknown_cache_s:  # a new load the listings missed?
            self._forced_at = time.monotonic()
            if version in await self.listed(force=True):
                return requested, version
        self._remember_unknown(version)
        raise UnknownModel(f"model `{requested}` is not loaded")

    def _known_unknown(self, version: int) -> bool:
        until = self._unknown.get(version)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._unknown[version]
        return False

    def _remember_unknown(self, version: int) -> None:
        if self.unknown_cache_s <= 0:
            return
        self._unknown[version] = time.monotonic() + self.unknown_cache_s
        self._unknown.move_to_end(version)
        while len(self._unknown) > self.UNKNOWN_KEPT:
            self._unknown.popitem(last=False)

    def record(self, version: int) -> VersionRecord | None:
        """What the gateway knows of `version`: the book's record, or the store's announcement (the store is
        the record of versions: a replica's gateway may not have read its AdapterReady yet)."""
        rec = self.book.record(version)
        if rec is not None or version < 1:
            return rec
        ready = read_manifest(self.adapters.store, version)
        return VersionRecord(version, path=ready.path, sha256=ready.sha256) if ready else None

    async def make_servable(self, version: int, force: bool = False, everywhere: bool = False) -> None:
        """Load `version` if no engine lists it (or, `everywhere`, any routable engine lacks it); raises
        PolicyUnavailable if it cannot be. `force` re-reads the listings first."""
        listings = await self.listings(force)
        lacking = [u for u, listed in listings.items() if version not in listed]
        if not lacking or (not everywhere and len(lacking) < len(listings)):
            return
        await self._ensure(version, None)

    async def make_servable_at(self, url: str, version: int) -> None:
        """The engine at `url` answered 404 for `version`: load it there."""
        await self._ensure(version, url)

    async def _ensure(self, version: int, url: str | None) -> None:
        rec = self.record(version)
        if rec is None:
            raise PolicyUnavailable(f"{version_name(version)} is unknown")
        try:
            if url is None:
                await anyio.to_thread.run_sync(self.adapters.ensure, rec)
            else:
                await anyio.to_thread.run_sync(self.adapters.ensure_at, url, rec)
        except NotServable as exc:
            raise PolicyUnavailable(f"{version_name(version)} cannot be served: {exc}") from exc
        await self.listings(force=True)


class EngineClients:
    """One pooled async HTTP client per engine URL (the request path)."""

    def __init__(self, timeout_s: float, headers: dict[str, str] | None = None):
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})  # vLLM's API key (Authorization)
        self._clients: dict[str, httpx.AsyncClient] = {}

    def get(self, url: str) -> httpx.AsyncClient:
        if url not in self._clients:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
            self._clients[url] = httpx.AsyncClient(base_url=url, timeout=self.timeout_s, limits=limits,
                                                   headers=self.headers)
        return self._clients[url]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def engine_access(settings, store_dir: Path) -> tuple[EngineClients, EngineAdapters]:
    """The clients of the engines a component's settings name (`vllm_url`, `vllm_resolve_dns`, `engine_down_s`,
    `request_timeout_s` and vLLM's API key: core.settings._ServingEngines and _VllmClient): async clients for
    the request path, and the adapter loader (its `pool` is the engines' pool)."""
    from service.gateway.endpoints import engine_urls

    pool = EnginePool(engine_urls(settings.vllm_url), settings.vllm_resolve_dns, down_s=settings.engine_down_s)
    headers = settings.vllm_headers()  # vLLM's API key, when it has one
    return EngineClients(settings.request_timeout_s, headers), EngineAdapters(pool, store_dir, headers=headers)

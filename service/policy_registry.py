"""Which policy versions the serving engine has loaded, and what the alias `policy` means.

The gateway reads vLLM's `/v1/models` (loaded LoRA adapters are listed there)
instead of trusting `odpo.adapters`, so `policy` never resolves to a version
the engine cannot serve yet. The listing is cached for `refresh_s`.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from service.contracts import BASE_MODEL_NAME, POLICY_ALIAS, parse_version_name, version_name


class UnknownModel(LookupError):
    """The requested model name is not served."""


class PolicyRegistry:
    def __init__(self, client: httpx.AsyncClient, refresh_s: float = 1.0):
        self._client = client
        self._refresh_s = refresh_s
        self._versions: list[int] = []
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def versions(self, force: bool = False) -> list[int]:
        """Loaded versions, ascending (0 = `base`). Raises httpx errors when the engine is down."""
        async with self._lock:
            if force or time.monotonic() - self._fetched_at > self._refresh_s:
                resp = await self._client.get("/v1/models")
                resp.raise_for_status()
                names = (m.get("id", "") for m in resp.json().get("data", []))
                self._versions = sorted(v for v in map(parse_version_name, names) if v is not None)
                self._fetched_at = time.monotonic()
            return list(self._versions)

    async def promoted(self) -> int | None:
        """The version `policy` resolves to: the newest loaded one (None when nothing is loaded)."""
        loaded = await self.versions()
        return loaded[-1] if loaded else None

    async def resolve(self, requested: str) -> str:
        """Served name for a requested model: `policy`, `base` or `policy-vN`."""
        if requested == POLICY_ALIAS:
            version = await self.promoted()
            if version is None:
                raise UnknownModel("no policy version is loaded yet")
            return version_name(version)
        version = parse_version_name(requested)
        if version is None:
            raise UnknownModel(f"unknown model `{requested}`; use `{POLICY_ALIAS}`, `{BASE_MODEL_NAME}` or `policy-v<N>`")
        if version not in await self.versions():
            await self.versions(force=True)  # it may have been loaded a moment ago
            if version not in self._versions:
                raise UnknownModel(f"model `{requested}` is not loaded")
        return requested

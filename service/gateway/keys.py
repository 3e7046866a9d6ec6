"""Client credentials: API keys with scopes and per-key limits, from a file that may change under us.

`ODPO_GATEWAY_API_KEYS_FILE` names a JSON or YAML list of keys (or a mapping
with a `keys` list), for instance a Kubernetes Secret mounted as a file:

    - id: team-a                  # on metrics (label `key`) and in the access log; never the key itself
      sha256: 9f86d0...           # hex sha256 of the key (or `key: <the key>` in clear)
      scopes: [inference, feedback, prompts]
      rate_per_s: 5               # token bucket: refill rate and size (`burst`, default max(1, rate))
      burst: 10
      daily_quota: 10000          # requests per UTC day
      feedback_per_hour: 100      # /v1/feedback messages per sliding hour
      feedback_per_response: 1    # feedback messages naming one response id (a second one: 409)

Limits left out (or null) are off. The file is re-read when it changes
(checked every `api_keys_check_s`): a rotated Secret applies without a
restart; a file that stops being valid is logged and the keys read last stay
in force. Presented keys are hashed and compared with every key's hash in
constant time. Counters are kept per key id, in memory, per gateway replica
(N replicas allow N times a key's rate and quotas; the id survives a
rotation, so a rotated key keeps its counters).

`ClientKeys` is the pure-ASGI middleware in front of the routes: it answers
401 (no or unknown key), 403 (the route's scope missing) and 429 with
`Retry-After` (rate, daily quota) before a request's body is read or any
engine is asked. `/healthz`, `/readyz`, `/metrics` and the API description
need no key.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.gateway.metrics import KEY_REFUSALS
from service.gateway.protocol import error

log = logging.getLogger(__name__)

SCOPES = ("inference", "feedback", "prompts")
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
ROUTE_SCOPES = {"/v1/chat/completions": "inference", "/v1/completions": "inference", "/v1/models": "inference",
                "/v1/feedback": "feedback", "/v1/prompts": "prompts"}
DAY_S = 86400.0
HOUR_S = 3600.0


class KeyFileError(ValueError):
    """The keys file cannot be read or is not a valid list of keys."""


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Shown on metrics and logs.")
    key: str | None = Field(default=None, min_length=16, max_length=512, description="The key in clear.")
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    scopes: list[Literal["inference", "feedback", "prompts"]] = Field(default_factory=lambda: ["inference"])
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    daily_quota: int | None = Field(default=None, ge=1)
    feedback_per_hour: int | None = Field(default=None, ge=1)
    feedback_per_response: int | None = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_secret(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `key` and `sha256`")
        return self


@dataclass(frozen=True)
class ApiKey:
    """One client key as the gateway holds it: its id, the sha256 of the key, scopes and limits."""

    id: str
    digest: bytes
    scopes: frozenset[str]
    rate_per_s: float | None = None
    burst: float = 1.0
    daily_quota: int | None = None
    feedback_per_hour: int | None = None
    feedback_per_response: int | None = 1


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> list[ApiKey]:
    """The keys in a keys file's text (JSON or YAML); raises KeyFileError."""
    try:
        raw = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError as exc:
        raise KeyFileError(f"not JSON or YAML: {exc}") from None
    if isinstance(raw, dict) and set(raw) == {"keys"}:
        raw = raw["keys"]
    if not isinstance(raw, list):
        raise KeyFileError("expected a list of keys (or a mapping with a `keys` list)")
    keys, ids, digests = [], set(), set()
    for i, item in enumerate(raw):
        try:
            entry = KeyEntry.model_validate(item)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()[:3])
            raise KeyFileError(f"key #{i + 1}: {problems}") from None
        digest = digest_of(entry.key) if entry.key is not None else bytes.fromhex(entry.sha256)
        if entry.id in ids:
            raise KeyFileError(f"key id `{entry.id}` appears twice")
        if digest in digests:
            raise KeyFileError(f"key `{entry.id}` has the same key as another one")
        ids.add(entry.id)
        digests.add(digest)
        burst = entry.burst if entry.burst is not None else max(1.0, entry.rate_per_s or 1.0)
        keys.append(ApiKey(entry.id, digest, frozenset(entry.scopes), entry.rate_per_s, float(burst),
                           entry.daily_quota, entry.feedback_per_hour, entry.feedback_per_response))
    return keys


class KeyRing:
    """The keys of `path`, re-read when the file changes (at most every `check_s`)."""

    def __init__(self, path: Path, check_s: float = 1.0):
        self.path = Path(path).expanduser()
        self.check_s = check_s
        self._stamp = self._stat()
        self._keys = parse_keys(self._read())  # a bad file at start is a bad setting: fail loudly
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()
        log.info("client API keys on: %d key(s) from %s", len(self._keys), self.path)

    def _stat(self):
        try:
            st = os.stat(self.path)  # follows links: a Secret's `..data` swap changes the inode
        except OSError as exc:
            raise KeyFileError(f"cannot read {self.path}: {exc.strerror}") from None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read {self.path}: {exc}") from None

    def keys(self) -> list[ApiKey]:
        """The keys in force (re-read first when the file changed)."""
        if time.monotonic() - self._checked_at >= self.check_s:
            self._reload()
        return self._keys

    def ids(self) -> list[str]:
        return [k.id for k in self.keys()]

    def _reload(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked_at < self.check_s:
                return
            self._checked_at = time.monotonic()
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return
                keys = parse_keys(self._read())
            except KeyFileError as exc:
                log.error("client API keys not reloaded, the %d read last stay in force: %s", len(self._keys), exc)
                return
            self._stamp, self._keys = stamp, keys
            log.info("client API keys reloaded: %d key(s) from %s", len(keys), self.path)

    def find(self, presented: str | None) -> ApiKey | None:
        """The key `presented` is, compared in constant time with every key's hash (no early exit)."""
        if not presented:
            return None
        digest = digest_of(presented)
        found = None
        for key in self.keys():
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


class KeyLimits:
    """Per key id: the request rate (token bucket) and the daily quota (per UTC day); one replica's counts."""

    def __init__(self):
        self._tokens: dict[str, tuple[float, float]] = {}  # id -> (tokens, at)
        self._days: dict[str, tuple[int, int]] = {}  # id -> (UTC day number, requests that day)
        self._lock = threading.Lock()

    def admit(self, key: ApiKey, now: float | None = None) -> tuple[str, float] | None:
        """None when `key` may make a request now (and counts it), else (reason, seconds to wait)."""
        now = time.time() if now is None else now
        with self._lock:
            tokens = None
            if key.rate_per_s is not None:
                have, at = self._tokens.get(key.id, (key.burst, now))
                tokens = min(key.burst, have + max(0.0, now - at) * key.rate_per_s)
                if tokens < 1.0:
                    self._tokens[key.id] = (tokens, now)
                    return "rate", (1.0 - tokens) / key.rate_per_s
            if key.daily_quota is not None:
                day, used = self._days.get(key.id, (0, 0))
                today = int(now // DAY_S)
                used = used if day == today else 0
                if used >= key.daily_quota:
                    return "daily_quota", (today + 1) * DAY_S - now
                self._days[key.id] = (today, used + 1)
            if tokens is not None:
                self._tokens[key.id] = (tokens - 1.0, now)
            return None


class FeedbackCaps:
    """Per key: feedback messages per sliding hour and per response id (bounded memory, one replica's)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._hour: dict[str, collections.deque[float]] = {}
        self._per_response: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, key: ApiKey, response_ids: list[str], now: float | None = None) -> tuple[int, str, float] | None:
        """Count one feedback message of `key` naming `response_ids`; None if allowed, else (status, message,
        Retry-After seconds or 0). Call `release` if the message is not published after all."""
        now = time.time() if now is None else now
        with self._lock:
            if key.feedback_per_response is not None:
                for rid in response_ids:
                    if self._per_response.get((key.id, rid), 0) >= key.feedback_per_response:
                        return (409, f"this key already gave feedback on response `{rid}` "
                                     f"({key.feedback_per_response} allowed per response)", 0.0)
            if key.feedback_per_hour is not None:
                recent = self._hour.setdefault(key.id, collections.deque())
                while recent and recent[0] <= now - HOUR_S:
                    recent.popleft()
                if len(recent) >= key.feedback_per_hour:
                    return (429, f"this key gave {key.feedback_per_hour} feedback messages in the last hour, "
                                 "its limit", recent[0] + HOUR_S - now)
                recent.append(now)
            for rid in response_ids:
                k = (key.id, rid)
                self._per_response[k] = self._per_response.get(k, 0) + 1
                self._per_response.move_to_end(k)
            while len(self._per_response) > self.capacity:
                self._per_response.popitem(last=False)
            return None

    def release(self, key: ApiKey, response_ids: list[str]) -> None:
        with self._lock:
            recent = self._hour.get(key.id)
            if key.feedback_per_hour is not None and recent:
                recent.pop()
            for rid in response_ids:
                k = (key.id, rid)
                if self._per_response.get(k, 0) > 1:
                    self._per_response[k] -= 1
                else:
                    self._per_response.pop(k, None)


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if kind.lower() == "bearer" else None
    return None


class ClientKeys:
    """Pure ASGI middleware: with a key ring, every request but the open paths needs a valid key with the
    route's scope, within its rate and daily quota. The key (its id) goes into `request.state.api_key`
    (`key_id`) for the routes, the metrics and the access log."""

    def __init__(self, app, ring: KeyRing | None, limits: KeyLimits | None = None):
        self.app, self.ring, self.limits = app, ring, limits or KeyLimits()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.ring is None or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        key = self.ring.find(_bearer(scope))
        if key is None:
            KEY_REFUSALS.labels("-", "unauthenticated").inc()
            return await error(401, "a valid API key is required: `Authorization: Bearer <key>`",
                               "authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        state["key_id"], state["api_key"] = key.id, key
        needed = ROUTE_SCOPES.get(scope.get("path", ""))
        if needed is not None and needed not in key.scopes:
            KEY_REFUSALS.labels(key.id, "forbidden").inc()
            return await error(403, f"this API key lacks the scope `{needed}`", "permission_error",
                               code="insufficient_scope")(scope, receive, send)
        refused = self.limits.admit(key)
        if refused is not None:
            reason, wait = refused
            KEY_REFUSALS.labels(key.id, reason).inc()
            what = "request rate" if reason == "rate" else "daily quota"
            return await error(429, f"this API key's {what} is used up; retry after the Retry-After seconds",
                               "rate_limit_error", code="rate_limit_exceeded" if reason == "rate"
                               else "quota_exceeded", headers=retry_after(wait))(scope, receive, send)
        return await self.app(scope, receive, send)


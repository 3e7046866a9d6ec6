"""Message keys as the settings name them: parsing and the HMAC itself (core/signing.py uses them).

Apart from core/signing.py so that core/settings.py can check a key setting when it is read (a key that
cannot be used is a settings error, exit code 2) without an import cycle.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

HEADER = "odpo-sig"
MIN_SECRET_BYTES = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class MessageKeyError(ValueError):
    """A message key setting that cannot be used."""


@dataclass(frozen=True)
class MessageKeys:
    """Key id -> secret; `signing` is the id of the key that signs (the first listed)."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def signing(self) -> str:
        return self.keys[0][0]

    def mac(self, key_id: str, topic: str, value: bytes | None) -> str | None:
        secret = dict(self.keys).get(key_id)
        if secret is None:
            return None
        return hmac.new(secret, topic.encode() + b"\0" + (value or b""), hashlib.sha256).hexdigest()

    def header(self, topic: str, value: bytes | None) -> bytes:
        return f"{self.signing}:{self.mac(self.signing, topic, value)}".encode()

    def check(self, topic: str, value: bytes | None, headers: Iterable | None) -> str | None:
        """None when the record carries a valid signature by a listed key, else the reason: `unsigned`,
        `unknown_key` or `mismatch`."""
        sig = None
        for name, raw in headers or ():
            if name == HEADER:
                sig = raw
        if sig is None:
            return "unsigned"
        try:
            key_id, _, digest = bytes(sig).decode("ascii").partition(":")
        except (UnicodeDecodeError, TypeError):
            return "mismatch"
        want = self.mac(key_id, topic, value)
        if want is None:
            return "unknown_key"
        return None if hmac.compare_digest(want, digest) else "mismatch"


def parse_keys(text: str) -> MessageKeys:
    """`id:secret` entries separated by commas or new lines (blank ones and `#` comments skipped)."""
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    keys: list[tuple[str, bytes]] = []
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        key_id, sep, secret = entry.partition(":")
        if not sep or not _KEY_ID.match(key_id):
            raise MessageKeyError("each message key must look like <id>:<secret>, the id of 1-32 letters, digits, "
                            "`.`, `_` or `-`")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise MessageKeyError(f"message key {key_id!r}: the secret needs at least {MIN_SECRET_BYTES} bytes")
        if key_id in dict(keys):
            raise MessageKeyError(f"message key id {key_id!r} is listed twice")
        keys.append((key_id, secret.encode()))
    if not keys:
        raise MessageKeyError("no message key in the setting")
    return MessageKeys(tuple(keys))


def keys_from(key: str | None, key_file: Path | None) -> MessageKeys | None:
    """The keys a `message_key` / `message_key_file` pair of settings names (None: signing is off)."""
    if key and key_file:
        raise MessageKeyError("set ODPO_MESSAGE_KEY or ODPO_MESSAGE_KEY_FILE, not both")
    if key_file is not None:
        try:
            key = Path(key_file).expanduser().read_text()
        except OSError as exc:
            raise MessageKeyError(f"cannot read the message key file {key_file}: {exc}") from None
    return parse_keys(key) if key else None



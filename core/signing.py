"""Signed messages: an HMAC-SHA256 header on every record a component publishes, checked where it is consumed.

Kafka has no authentication of its own here (the chart sets no SASL), so any
pod that reaches the broker can write any topic: forge a preference pair, a
prompt, an `AdapterReady`, a control-topic head. With a message key
configured, every record odpo writes carries the header

    odpo-sig: <key id>:<hex HMAC-SHA256(secret, topic NUL value)>

and every consumer of the topics in `SIGNED_TOPICS` sends a record without a
valid one to odpo.dlq (the control-topic reader, which has no producer, skips
it); `odpo_bus_signature_failures_total` counts them by reason. The topic is
inside the MAC so a record cannot be replayed onto another topic; a record
replayed onto its own topic is caught elsewhere (pair ids and the trainer's
ledger, the store's `announced/` record for `AdapterReady`, epochs on
odpo.control). The MAC covers the full topic name, prefix included (core/topics.py), so a record of one
deployment does not pass on another's topic even where both hold the same key.

Keys (CommonSettings `message_key` / `message_key_file`, i.e. `ODPO_MESSAGE_KEY`
or a mounted Secret named by `ODPO_MESSAGE_KEY_FILE`): one or more
`<id>:<secret>` entries separated by commas or new lines. Every listed key is
accepted; the first one signs. Rotation: (1) add the new key second
everywhere, (2) move it first everywhere, (3) drop the old one once no record
it signed is still needed (the compacted odpo.adapters and odpo.control keep
old records: the store keeps versions known, the gate writes its registry
again when it starts).

With no key configured nothing is signed and nothing is checked (a local
broker with no other writers); `odpo up` generates one key per run and gives
it to its children.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter

from core import message_keys, topics
from core.message_keys import MessageKeys, keys_from, parse_keys  # noqa: F401 - parse_keys: for odpo up, tests

from core.contracts import (
    TOPIC_ADAPTERS,
    TOPIC_CANDIDATES,
    TOPIC_CONTROL,
    TOPIC_SERVED,
    TOPIC_FEEDBACK,
    TOPIC_PREFERENCES,
    TOPIC_PROMPTS,
)

log = logging.getLogger(__name__)

HEADER = message_keys.HEADER
SIGNED_TOPICS = frozenset({TOPIC_PROMPTS, TOPIC_CANDIDATES, TOPIC_PREFERENCES, TOPIC_ADAPTERS, TOPIC_FEEDBACK,
                           TOPIC_CONTROL, TOPIC_SERVED})

SIGNATURE_FAILURES = Counter(
    "odpo_bus_signature_failures_total",
    "Records refused because their odpo-sig header is missing, names an unknown key id, or does not match "
    "(dead-lettered; on odpo.control skipped), by component, topic and reason.",
    ["component", "topic", "reason"])


_UNSET = object()
_keys: object = _UNSET
_lock = threading.Lock()


def configure(keys: MessageKeys | None) -> None:
    """Set this process's keys (each component does at start, from its CommonSettings; tests too)."""
    global _keys
    with _lock:
        _keys = keys
    if keys is not None:
        log.info("messages are signed with key %r; %d key(s) accepted", keys.signing, len(keys.keys))


def reset() -> None:
    """Forget the configured keys: the next use reads them from CommonSettings again (tests)."""
    global _keys
    with _lock:
        _keys = _UNSET


def configure_from(common) -> MessageKeys | None:
    """`configure` from a CommonSettings; returns the keys."""
    secret = common.message_key.get_secret_value() if common.message_key is not None else None
    keys = keys_from(secret, common.message_key_file)
    configure(keys)
    return keys


def current() -> MessageKeys | None:
    """This process's keys: the configured ones, else (first use) those CommonSettings names."""
    global _keys
    with _lock:
        if _keys is _UNSET:
            from core.settings import CommonSettings

            common = CommonSettings()
            secret = common.message_key.get_secret_value() if common.message_key is not None else None
            _keys = keys_from(secret, common.message_key_file)
        return _keys  # type: ignore[return-value]


def headers(topic: str, value: bytes | None) -> list[tuple[str, bytes]]:
    """The headers to send a record with: the signature when a key is configured, else none."""
    keys = current()
    return [] if keys is None else [(HEADER, keys.header(topic, value))]


def refusal(topic: str, value: bytes | None, record_headers, component: str, signed: bool | None = None) -> str | None:
    """None when the record may be read (signing off, a topic not in SIGNED_TOPICS unless `signed`, or a valid
    signature); else the reason, counted."""
    keys = current()
    if keys is None or not (topics.base_name(topic) in SIGNED_TOPICS if signed is None else signed):
        return None
    reason = keys.check(topic, value, record_headers)
    if reason is not None:
        SIGNATURE_FAILURES.labels(component, topic, reason).inc()
    return reason

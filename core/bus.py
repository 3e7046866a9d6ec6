"""Kafka helpers: typed publish, typed consume with dead-lettering, commit-after-effect.

Consumer-group settings are the ones that join on Tansu (a join hangs with
kafka-python's defaults, and takes about 3 s with these). Auto-commit is off
everywhere: a consumer commits only after its effect is durable.

Every Kafka client of odpo is made here (`new_producer`, `new_consumer`,
`new_admin`), so every one takes the security settings (TLS, SASL) of
`CommonSettings.kafka_*`: a component calls `configure_kafka(common)` at
start; a process that never does (a one-shot tool) reads them from its
environment and `ODPO_CONFIG` on first use. tests/test_kafka_security.py
fails when a module builds a kafka-python client itself.

Names: every topic is named by `core.topics.topic_name(base)` (the
deployment's `topic_prefix` + a `TOPIC_*` base name of core/contracts.py) and
every consumer group gets the prefix in `new_consumer`; `configure_kafka` sets
both for the process. `ensure_topics` creates topics with the configured
partitions and replication factor (core/topics.py says which stay at one
partition).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter
from pydantic import ValidationError

from core import signing, topics
from core.contracts import TOPIC_ADAPTERS, TOPIC_CONTROL, TOPIC_DLQ, TOPIC_SERVED, DeadLetter, _Message
from core.settings import CommonSettings, secret_value

log = logging.getLogger(__name__)

M = TypeVar("M", bound=_Message)

DEAD_LETTERS = Counter("odpo_bus_dead_letters_total", "Messages sent to odpo.dlq, by component and source topic.",
                       ["component", "topic"])

REWINDS = Counter("odpo_bus_topic_rewinds_total", "Times a consumer found its topic recreated (a broker restart) "
                  "and read it again from its start, by component and topic.", ["component", "topic"])

REJOINS = Counter("odpo_bus_consumer_rejoins_total", "Times a consumer stuck outside a stable group was replaced by "
                  "a new one, by component and topic.", ["component", "topic"])
STUCK_S = 30.0  # a join takes 3-5 s on Tansu; a member unstable this long is replaced (see Inbox)

GROUP_SETTINGS = dict(max_poll_interval_ms=10_000, session_timeout_ms=6_000, heartbeat_interval_ms=2_000)


# odpo.adapters is compacted, not deleted by age: its keys are version names, so compaction keeps one message
# per version and retention never empties it. (The adapter store stays the record; this is the fast path.)
# odpo.control likewise: one message per version record plus the head (service/registry/control_log.py), so
# compaction keeps the gate's whole registry and nothing else.
COMPACT = {"cleanup.policy": "compact"}


def retention(seconds: float) -> dict[str, str]:
    """The config of a topic whose messages are deleted `seconds` after they were written."""
    return {"retention.ms": str(int(seconds * 1000))}


# odpo.served is deleted by age; this is the gateway's default `served_retention_s` (7 days), for where the
# topic is created before any gateway (`odpo up`, tests); a gateway that creates it uses its own setting.
# Tansu 0.6 takes topic configs on creation but answers DescribeConfigs with none and deletes nothing by age
# (measured), so on Tansu the gateway's own age filter (service/gateway/served_log.py) is what holds.
# Keyed by base name (core/topics.py).
TOPIC_CONFIGS = {TOPIC_ADAPTERS: COMPACT, TOPIC_CONTROL: COMPACT, TOPIC_SERVED: retention(7 * 24 * 3600)}


_security: dict | None = None  # the kafka-python arguments of `CommonSettings.kafka_*`; None: not read yet


def kafka_security(common: CommonSettings) -> dict:
    """kafka-python's security arguments from the settings (the SASL password file is read now)."""
    out: dict = {"security_protocol": common.kafka_security_protocol}
    if common.kafka_security_protocol.startswith("SASL_"):
        out.update(sasl_mechanism=common.kafka_sasl_mechanism, sasl_plain_username=common.kafka_sasl_username,
                   sasl_plain_password=secret_value(common.kafka_sasl_password, common.kafka_sasl_password_file))
    if common.kafka_security_protocol in ("SSL", "SASL_SSL"):
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(common, f"kafka_ssl_{name}")
            if path is not None:
                out[f"ssl_{name}"] = str(path)
    return out


def configure_kafka(common: CommonSettings) -> None:
    """Make every Kafka client this process builds from now on use `common`'s security settings, and every
    topic and group name its `topic_prefix` (core/topics.py)."""
    global _security
    _security = kafka_security(common)
    topics.configure(topics.layout_of(common))


def kafka_client_config(**settings) -> dict:
    """`settings` with the security arguments added (they win over anything a caller passes)."""
    global _security
    if _security is None:
        _security = kafka_security(CommonSettings())
    return {**settings, **_security}


def new_producer(bootstrap: str, **settings) -> KafkaProducer:
    """A kafka-python producer with the security settings."""
    return KafkaProducer(**kafka_client_config(bootstrap_servers=bootstrap, **settings))


def new_consumer(bootstrap: str, *names: str, **settings) -> KafkaConsumer:
    """A kafka-python consumer (subscribed to the topics `names`, full names, if any) with the security settings.
    A `group_id` is a configured group id: the deployment's prefix is added here (core/topics.py), so no
    consumer of odpo joins or reads another deployment's group."""
    if settings.get("group_id"):
        settings["group_id"] = topics.group_name(settings["group_id"])
    return KafkaConsumer(*names, **kafka_client_config(bootstrap_servers=bootstrap, **settings))


def new_admin(bootstrap: str, **settings) -> KafkaAdminClient:
    """A kafka-python admin client with the security settings."""
    return KafkaAdminClient(**kafka_client_config(bootstrap_servers=bootstrap, **settings))


def ensure_topics(bootstrap: str, names: Iterable[str] | None = None, partitions: int | None = None,
                  configs: dict[str, str] | None = None) -> None:
    """Create the topics that do not exist yet (idempotent): `names` are full names (`topics.topic_name`; default:
    every topic of the deployment), created with the configured partitions (`partitions` overrides; one for the
    topics core/topics.py keeps at one) and replication factor, and their `TOPIC_CONFIGS` (or `configs`, for
    topics under other names). A topic that exists is left as it is."""
    layout = topics.current()
    names = layout.all_topics() if names is None else list(names)
    admin = new_admin(bootstrap)
    try:
        missing = set(names) - set(admin.list_topics())
        for name in sorted(missing):
            try:
                admin.create_topics([NewTopic(name, num_partitions=partitions or layout.partitions_of(name),
                                              replication_factor=layout.replication_factor,
                                              topic_configs=configs or TOPIC_CONFIGS.get(layout.base(name), {}))])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def make_producer(bootstrap: str, **settings) -> KafkaProducer:
    # Not idempotent: an idempotent producer holds a producer id the broker issued, and after a broker that
    # lost its state (the memory-only embedded broker restarted, a recreated cluster) every send fails with a
    # fatal UnknownProducerIdError until the process restarts. A retried send may write a message twice
    # instead; every consumer here deduplicates by id (deterministic pair ids, the trainer's ledger).
    return new_producer(bootstrap, **{**dict(acks="all", linger_ms=5, retries=5, enable_idempotence=False), **settings})


def publish(producer: KafkaProducer, topic: str, key: str | None, message: _Message, flush: bool = True) -> None:
    """Send one contract message, signed when a message key is configured (core/signing.py); with `flush` it is
    durable when this returns."""
    future = send(producer, topic, key, message.to_bytes())
    if flush:
        producer.flush()
        future.get(timeout=30)


def send(producer: KafkaProducer, topic: str, key: str | None, value: bytes | None, **kwargs):
    """`producer.send` of raw bytes with the signature header (every producer of odpo's topics sends through
    this or `publish`); returns the future."""
    return producer.send(topic, key=key.encode() if key is not None else None, value=value,
                         headers=signing.headers(topic, value), **kwargs)


@dataclass(frozen=True)
class Envelope(Generic[M]):
    """A valid message with where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: M


def dead_letter(producer: KafkaProducer, record, error: str, component: str) -> None:
    """Publish a `DeadLetter` for a record that could not be processed, and flush it."""
    raw = record.value if isinstance(record.value, bytes) else str(record.value).encode()
    key = record.key.decode(errors="replace") if record.key else None
    letter = DeadLetter(source_topic=record.topic, partition=record.partition, offset=record.offset, key=key,
                        payload=raw.decode(errors="replace"), error=error[:4000], component=component)
    publish(producer, topics.topic_name(TOPIC_DLQ), key, letter)
    DEAD_LETTERS.labels(component, record.topic).inc()
    log.warning("%s: dead-lettered %s[%d]@%d: %s", component, record.topic, record.partition, record.offset,
                error.splitlines()[0][:200])


def validation_message(exc: ValidationError) -> str:
    """A short, readable reason from a pydantic error."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "message"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def group_stable(consumer: KafkaConsumer) -> bool:
    """True while the consumer is a member of a stable group (True too where this kafka-python does not say)."""
    try:
        from kafka.structs import MemberState

        return consumer._coordinator.state == MemberState.STABLE
    except (AttributeError, ImportError):
        return True


def topic_id_of(consumer, topic: str):
    """The topic's id in the consumer's metadata (None where this kafka-python or broker does not say)."""
    try:
        return consumer._client.cluster.topic_id(topic)
    except AttributeError:
        return None


class Inbox(Generic[M]):
    """Consumes one topic as `model` messages; invalid ones go to the DLQ.

    With a `group_id` the consumer joins that group and resumes from its
    committed offsets; without one it reads every partition from the start
    (for topics that every replica must see in full, like `odpo.adapters`).

    A recreated topic (new topic id: a memory-only broker restarted, or an
    operator deleted and created it) is read from its start again. kafka-python
    keeps a partition's position across the rebalance that follows, and Tansu
    answers a fetch past a partition's end with nothing (no out-of-range reset),
    so without the rewind the new topic's first records would be skipped: the
    old position's worth of pairs lost. Records read twice are the consumers'
    business (the trainer's ledger, the judge's deterministic pair ids).

    A group member that has not been in a stable group for `stuck_s` is closed
    and replaced by a new consumer, which resumes from the committed offsets.
    kafka-python 3.0.12 can stay in "rebalance in progress" for good: when its
    JoinGroup/SyncGroup completes while no poll awaits it (a poll's timeout
    ran out during the ~3 s join Tansu takes after a restart), nothing marks
    the member stable again and every commit fails (seen in the generator's
    test of a recreated topic, and once in the trainer).
    """

    def __init__(self, bootstrap: str, topic: str, model: type[M], component: str, producer: KafkaProducer,
                 group_id: str | None, max_poll_records: int = 100, stuck_s: float = STUCK_S):
        self.topic, self.model, self.component, self.producer = topic, model, component, producer
        self.group_id, self.stuck_s = group_id, stuck_s
        self.bootstrap = bootstrap
        self._settings = dict(enable_auto_commit=False, auto_offset_reset="earliest",
                              max_poll_records=max_poll_records, client_id=f"odpo-{component}")
        if group_id:
            self.consumer = self._member()
        else:
            self.consumer = new_consumer(bootstrap, **self._settings)
            parts = self.consumer.partitions_for_topic(topic) or {0}
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            self.consumer.assign(tps)
            self.consumer.seek_to_beginning(*tps)
        self.dead_lettered = 0
        self.rewinds = 0  # times the topic was found recreated and read again from its start
        self.rejoins = 0  # times a member stuck outside a stable group was replaced by a new consumer
        self._topic_id = None
        self._unstable_since: float | None = None  # first poll that found the member outside a stable group

    def _member(self) -> KafkaConsumer:
        return new_consumer(self.bootstrap, self.topic, group_id=self.group_id, **GROUP_SETTINGS, **self._settings)

    def poll(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Envelope[M]]:
        """Valid messages in partition order; invalid ones are dead-lettered (flushed) and skipped."""
        self._rewind_if_recreated()
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if self._rewind_if_recreated():
            return []  # fetched at the old topic's positions: read again from the new start
        self._rejoin_if_stuck()
        out: list[Envelope[M]] = []
        for tp in sorted(batches, key=lambda t: t.partition):
            for rec in batches[tp]:
                env = self._decode(rec)
                if env is not None:
                    out.append(env)
        return out

    def _rewind_if_recreated(self) -> bool:
        topic_id = topic_id_of(self.consumer, self.topic)
        if topic_id is None or topic_id == self._topic_id:
            return False
        known, self._topic_id = self._topic_id, topic_id
        if known is None:
            return False  # the first id seen
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.seek_to_beginning(*assigned)
        self.rewinds += 1
        REWINDS.labels(self.component, self.topic).inc()
        log.warning("%s: %s was recreated (a broker restart?); reading it again from its start", self.component,
                    self.topic)
        return True

    def _rejoin_if_stuck(self) -> None:
        if not self.group_id:
            return
        now = time.monotonic()
        if group_stable(self.consumer):
            self._unstable_since = None
            return
        if self._unstable_since is None:
            self._unstable_since = now
        if now - self._unstable_since < self.stuck_s:
            return
        log.warning("%s: not in a stable group on %s for %.0f s; joining again with a new consumer (it resumes from "
                    "the committed offsets)", self.component, self.topic, now - self._unstable_since)
        self._unstable_since = now  # whatever happens next, the next try is `stuck_s` away
        try:
            new = self._member()
        except KafkaError as exc:  # the broker is down: keep the old member until the next try
            log.warning("%s: no new consumer yet (%s)", self.component, exc)
            return
        old, self.consumer = self.consumer, new
        try:
            old.close(timeout_ms=5000)
        except Exception as exc:  # noqa: BLE001 - a consumer that cannot leave cleanly is dropped all the same
            log.warning("%s: closing the stuck consumer failed (%s)", self.component, exc)
        self.rejoins += 1
        REJOINS.labels(self.component, self.topic).inc()

    def commit_positions(self, pending: Iterable[Envelope[M]] = ()) -> dict[TopicPartition, int]:
        """Per assigned partition, the offset a commit may name: the lowest `pending` (read, not yet done)
        envelope's, never past the read position (an envelope read before a rewind has an offset of the
        old topic, which may lie past what the new topic holds)."""
        pending, out = list(pending), {}
        for tp in self.consumer.assignment():
            offsets = [e.offset for e in pending if e.partition == tp.partition and e.topic == tp.topic]
            out[tp] = min([*offsets, self.consumer.position(tp)])
        return out

    def _decode(self, rec) -> Envelope[M] | None:
        refused = signing.refusal(rec.topic, rec.value, getattr(rec, "headers", None), self.component)
        if refused is not None:
            self._reject(rec, f"signature: {refused} (odpo-sig header; see core/signing.py)")
            return None
        try:
            value = self.model.from_bytes(rec.value)
        except ValidationError as exc:
            self._reject(rec, f"invalid {self.model.__name__}: {validation_message(exc)}")
            return None
        except (ValueError, TypeError) as exc:
            self._reject(rec, f"undecodable {self.model.__name__}: {exc}")
            return None
        key = rec.key.decode(errors="replace") if rec.key else None
        return Envelope(rec.topic, rec.partition, rec.offset, key, value)

    def _reject(self, rec, reason: str) -> None:
        dead_letter(self.producer, rec, reason, self.component)
        self.dead_lettered += 1

    def reject(self, env: Envelope[M], reason: str) -> None:
        """Dead-letter a message that was valid but could not be processed."""
        payload = env.value.to_bytes()
        rec = _Record(env.topic, env.partition, env.offset, env.key.encode() if env.key else None, payload)
        self._reject(rec, reason)

    def commit(self, upto: Iterable[Envelope[M]] | None = None) -> None:
        """Commit after the effect is durable: through the given envelopes, or everything polled."""
        if not self.group_id:
            return
        if upto is None:
            self.consumer.commit()
            return
        offsets: dict[TopicPartition, int] = {}
        for env in upto:
            tp = TopicPartition(env.topic, env.partition)
            offsets[tp] = max(offsets.get(tp, -1), env.offset + 1)
        if offsets:
            self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})

    def close(self) -> None:
        self.consumer.close()


class TopicTail:
    """Reads topics from their start with an assigned consumer and no group.

    It commits nothing and joins no group, so it never takes a message from
    the components that consume the same topics (progress views, tests).
    """

    def __init__(self, bootstrap: str, names: Iterable[str], client_id: str = "odpo-tail"):
        """`names`: full topic names (`topics.topic_name`)."""
        self._consumer = new_consumer(bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                      client_id=client_id)
        tps = [TopicPartition(t, p) for t in names for p in sorted(self._consumer.partitions_for_topic(t) or {0})]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)

    def rewind(self) -> None:
        """Read every assigned partition from its beginning again (takes effect on the next poll). For a broker
        that restarted empty: a fetch past its new end answers nothing on Tansu (no out-of-range reset), so
        without a rewind the first records of the new topic would be skipped."""
        self._consumer.seek_to_beginning(*self._consumer.assignment())

    def poll(self, timeout_ms: int = 500) -> list:
        """The records that arrived since the last poll (kafka-python ConsumerRecords), in order per partition."""
        return [r for recs in self._consumer.poll(timeout_ms=timeout_ms).values() for r in recs]

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True)
class _Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

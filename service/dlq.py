"""`odpo dlq replay`: put a topic's dead letters back on it once the cause is fixed.

A consumer sends a record it cannot validate or process to odpo.dlq as a
`DeadLetter` (core/bus.py: source topic, partition, offset, key, payload,
error, component). After a fix (a new release that accepts the message, a
judge or trainer that failed for a passing reason, a key rotation done right)
`replay` reads odpo.dlq from its start to its end, takes the dead letters of
one source topic (optionally only those written since a time, or from a DLQ
offset on), validates each payload again with that topic's model
(`core.contracts.TOPIC_MODELS`) and publishes the valid ones to the source
topic through the signed path (`core.bus.send`: signed with this process's
message key, when one is configured). Every name has the deployment's topic
prefix (core/topics.py).

Each record is replayed once: after its copy is written, a `DlqReplayed`
marker goes to the compacted one-partition topic odpo.dlq.replayed, keyed by
the digest of the original record (source topic, partition, offset,
payload), and a later run skips every record a marker names (a record
dead-lettered twice, by two consumers or after a rewind, is one record). A
crash between the copy and its marker replays that record again on the next
run: the consumers deduplicate (pair ids, the trainer's ledger), as they do
for any retried send. `--dry-run` writes nothing, markers included.

Not replayed: a payload that still fails validation (reported with the
reason; a later run tries it again), a dead letter of another deployment's
topic, and, unless `resign`, a record dead-lettered for its signature: a
replay signs what it writes, so it would turn a record nobody signed (a
forgery) into a signed one; `--resign` is for records a known component
wrote under a key that was wrongly set, after checking where they came from.
For the same reason, with signing on, a record on odpo.dlq itself is taken
only with a valid signature (every consumer signs the dead letters it
writes): anyone who can write to odpo.dlq could otherwise have a payload
signed by the replay.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from kafka import TopicPartition
from pydantic import ValidationError

from core import signing
from core.bus import COMPACT, ensure_topics, make_producer, new_consumer, publish, send, validation_message
from core.contracts import TOPIC_DLQ, TOPIC_DLQ_REPLAYED, TOPIC_MODELS, DeadLetter, DlqReplayed
from core.errors import UsageError
from core.topics import topic_name

# Source topics whose dead letters may be replayed (base names).
REPLAYABLE = tuple(t for t in TOPIC_MODELS if t not in (TOPIC_DLQ, TOPIC_DLQ_REPLAYED))
READ_TIMEOUT_S = 60.0  # reading odpo.dlq (or the markers) to its end takes longer than this: the broker is away
SIGNATURE_ERROR = "signature:"  # how core/bus.py's Inbox starts the error of a record refused for its signature


@dataclass(frozen=True)
class ReplayOptions:
    topic: str  # a base name of REPLAYABLE
    since: float | None = None  # only dead letters written at or after this time (epoch seconds)
    from_offset: int | None = None  # only dead letters at this DLQ offset or later (in each DLQ partition)
    dry_run: bool = False
    limit: int | None = None  # replay at most this many
    resign: bool = False  # also replay records dead-lettered for their signature


@dataclass(frozen=True)
class Row:
    dlq: str  # partition:offset on odpo.dlq
    source: str  # partition@offset on the source topic
    key: str
    component: str
    outcome: str  # replayed, would replay, still invalid, skipped
    detail: str  # where the copy went, or why not


@dataclass
class ReplayReport:
    topic: str  # the full name of the source topic
    dry_run: bool
    rows: list[Row] = field(default_factory=list)
    other_topics: int = 0  # dead letters of other source topics (or another deployment's)
    not_selected: int = 0  # dead letters of the topic before --since / --from-offset
    unreadable: int = 0  # records on odpo.dlq that are no DeadLetter
    unsigned: int = 0  # with signing on: records on odpo.dlq without a valid signature (not from a consumer of odpo)
    left_by_limit: int = 0  # replayable dead letters beyond --limit

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.rows)

    def table(self) -> str:
        """The rows as an aligned table, then one summary line."""
        head = ("dlq", "source", "key", "component", "outcome", "detail")
        rows = [head] + [(r.dlq, r.source, r.key, r.component, r.outcome, r.detail) for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths)), row[-1]]).rstrip() for row in rows]
        done = "would replay" if self.dry_run else "replayed"
        summary = (f"{self.topic}: {self.count(done)} {done}, {self.count('still invalid')} still invalid, "
                   f"{self.count('skipped')} skipped")
        extra = [f"{n} {what}" for n, what in ((self.left_by_limit, "left by --limit"),
                                               (self.not_selected, "before --since/--from-offset"),
                                               (self.other_topics, "of other topics"),
                                               (self.unreadable, "unreadable"),
                                               (self.unsigned, "not validly signed")) if n]
        if extra:
            summary += f" ({'; '.join(extra)} on the DLQ)"
        return "\n".join((lines if self.rows else []) + [summary])


def parse_since(text: str) -> float:
    """An ISO 8601 time (no zone: UTC) as epoch seconds; UsageError if it is none."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r} is not an ISO 8601 time (e.g. 2025-01-31T12:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def check_topic(topic: str) -> str:
    """The base name of a replayable topic (given as a base name or with this deployment's prefix)."""
    for base in REPLAYABLE:
        if topic in (base, topic_name(base)):
            return base
    raise UsageError(f"--topic {topic!r}: dead letters can be replayed to {', '.join(REPLAYABLE)}")


def record_digest(letter: DeadLetter) -> str:
    """The original record a dead letter stands for (what a marker names)."""
    blob = json.dumps([letter.source_topic, letter.partition, letter.offset, letter.payload], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_to_end(bootstrap: str, topic: str, timeout_s: float = READ_TIMEOUT_S) -> list:
    """Every record of `topic` (a full name) up to its end as it is now, by partition and offset; [] when the
    topic does not exist (nothing is created)."""
    consumer = new_consumer(bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                            client_id="odpo-dlq-replay", request_timeout_ms=15_000)
    try:
        if topic not in consumer.topics():
            return []
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends, out = consumer.end_offsets(tps), []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic} not read to its end within {timeout_s:.0f} s")
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        for records in consumer.poll(timeout_ms=0).values():  # the rest of the last batch
            out.extend(records)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def replayed_records(bootstrap: str) -> set[str]:
    """The digests of every record replayed before (validly signed markers only, when signing is on)."""
    topic, done = topic_name(TOPIC_DLQ_REPLAYED), set()
    for rec in read_to_end(bootstrap, topic):
        if rec.value is None or signing.refusal(topic, rec.value, rec.headers, "dlq-replay", signed=True):
            continue
        try:
            done.add(DlqReplayed.from_bytes(rec.value).record)
        except ValueError:
            continue
    return done


def replay(bootstrap: str, opts: ReplayOptions) -> ReplayReport:
    """Replay `opts.topic`'s dead letters (see the module's docstring); the report has a row per dead letter of
    the topic that was selected."""
    base = check_topic(opts.topic)
    source, model = topic_name(base), TOPIC_MODELS[base]
    dlq = topic_name(TOPIC_DLQ)
    report = ReplayReport(topic=source, dry_run=opts.dry_run)
    done = replayed_records(bootstrap)
    letters = read_to_end(bootstrap, dlq)
    producer = None
    try:
        for rec in letters:
            if signing.refusal(dlq, rec.value, rec.headers, "dlq-replay", signed=True):
                report.unsigned += 1  # every consumer signs its dead letters: a replay must not sign a forged one
                continue
            try:
                letter = DeadLetter.from_bytes(rec.value)
            except (ValueError, TypeError):
                report.unreadable += 1
                continue
            if letter.source_topic != source:
                report.other_topics += 1
                continue
            if (opts.since is not None and letter.created_at < opts.since) or \
                    (opts.from_offset is not None and rec.offset < opts.from_offset):
                report.not_selected += 1
                continue

            def row(outcome: str, detail: str) -> Row:
                return Row(f"{rec.partition}:{rec.offset}", f"{letter.partition}@{letter.offset}", letter.key or "-",
                           letter.component, outcome, detail)

            digest = record_digest(letter)
            if digest in done:
                report.rows.append(row("skipped", "replayed before"))
                continue
            if letter.error.startswith(SIGNATURE_ERROR) and not opts.resign:
                report.rows.append(row("skipped", f"dead-lettered for its signature ({letter.error[:80]}); "
                                                  "--resign replays it signed with this process's key"))
                continue
            try:
                value = model.from_bytes(letter.payload.encode())
            except ValidationError as exc:
                report.rows.append(row("still invalid", f"invalid {model.__name__}: {validation_message(exc)}"))
                continue
            except (ValueError, TypeError) as exc:
                report.rows.append(row("still invalid", f"undecodable {model.__name__}: {exc}"))
                continue
            if opts.limit is not None and report.count("would replay" if opts.dry_run else "replayed") >= opts.limit:
                report.left_by_limit += 1
                continue
            if opts.dry_run:
                report.rows.append(row("would replay", f"first dead-lettered for: {letter.error[:80]}"))
                done.add(digest)
                continue
            if producer is None:
                ensure_topics(bootstrap, [topic_name(TOPIC_DLQ_REPLAYED)], partitions=1, configs=COMPACT)
                producer = make_producer(bootstrap)
            meta = send(producer, source, letter.key, value.to_bytes()).get(timeout=30)  # signed: core/signing.py
            publish(producer, topic_name(TOPIC_DLQ_REPLAYED), digest, DlqReplayed(
                record=digest, source_topic=source, source_partition=letter.partition, source_offset=letter.offset,
                dlq_partition=rec.partition, dlq_offset=rec.offset, replayed_partition=meta.partition,
                replayed_offset=meta.offset))
            done.add(digest)
            report.rows.append(row("replayed", f"to {meta.partition}@{meta.offset}"))
    finally:
        if producer is not None:
            producer.close()
    return report

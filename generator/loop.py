"""The sampler loop: odpo.prompts -> odpo.candidates with bounded concurrency and in-order commits.

At most `max_in_flight` prompts are sampled at once on a thread pool. While
the budget is full the consumer's partitions are paused and `poll` keeps
being called, so the group membership stays alive. Each worker publishes its
CandidateSet (flushed) itself; the loop commits a partition only up to the
first prompt whose outcome is not durable yet, so a crash replays every
prompt whose candidates were not published (at-least-once, in order).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from generator.metrics import PROMPTS, PROMPTS_REJECTED, REQUEST_RETRIES, SAMPLES, TOKENS
from generator.sampler import PromptRejected, Sampler, ServerFailed
from core.bus import Envelope, Inbox, publish
from core.contracts import TOPIC_CANDIDATES, PromptEvent
from core.topics import topic_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How one prompt ended: published, rejected (dead-letter it) or abandoned (stopping: not committed)."""

    status: str
    reason: str = ""


class SamplerLoop:
    def __init__(self, inbox: Inbox[PromptEvent], sampler: Sampler, producer: KafkaProducer, max_in_flight: int,
                 max_attempts: int, stop: threading.Event, retry_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0):
        self.inbox, self.sampler, self.producer, self.stop = inbox, sampler, producer, stop
        self.max_in_flight, self.max_attempts = max_in_flight, max_attempts
        self.retry_backoff_s, self.max_backoff_s = retry_backoff_s, max_backoff_s
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="odpo-sample")
        self._pending: dict[TopicPartition, deque[tuple[Envelope[PromptEvent], Future]]] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._blocked: set[TopicPartition] = set()  # an abandoned prompt: nothing past it may be committed
        self._orphans: list[tuple[Envelope[PromptEvent], Future]] = []  # read from a topic since recreated
        self._rewinds = 0
        self._halt = threading.Event()  # ends workers' retry waits when the loop closes

    @property
    def in_flight(self) -> int:
        return sum(len(q) for q in self._pending.values()) + len(self._orphans)

    @property
    def committed(self) -> dict[TopicPartition, int]:
        """Offsets this loop has committed, per partition."""
        return dict(self._committed)

    def run(self, drain_timeout_s: float = 30.0) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            self.close(drain_timeout_s)

    def step(self, poll_timeout_ms: int = 200) -> None:
        self._harvest()
        budget = self.max_in_flight - self.in_flight
        self._flow_control(full=budget <= 0)
        for env in self.inbox.poll(timeout_ms=poll_timeout_ms, max_records=max(budget, 1)):
            PROMPTS.inc()
            tp = TopicPartition(env.topic, env.partition)
            self._pending.setdefault(tp, deque()).append((env, self._pool.submit(self._process, env)))
        self._harvest()

    def close(self, drain_timeout_s: float) -> None:
        """Let requests in flight finish (retries stop at once), commit what is durable, stop the pool."""
        self._halt.set()
        futures = [f for q in self._pending.values() for _, f in q] + [f for _, f in self._orphans]
        for f in futures:
            try:
                f.result(timeout=drain_timeout_s)
            except Exception:  # noqa: BLE001 - _process returns outcomes; anything else is logged by _harvest
                pass
        self._harvest()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- worker side ---------------------------------------------------------------------------------
    def _process(self, env: Envelope[PromptEvent]) -> Outcome:
        attempts, backoff = 0, self.retry_backoff_s
        while True:
            try:
                cands = self.sampler.sample(env.value)
                publish(self.producer, topic_name(TOPIC_CANDIDATES), env.value.id, cands)
                SAMPLES.inc(len(cands.completions))
                TOKENS.inc(sum(len(c.token_ids) for c in cands.completions))
                return Outcome("published")
            except PromptRejected as exc:
                return Outcome("rejected", str(exc))
            except ServerFailed as exc:
                attempts += 1
                if attempts >= self.max_attempts:
                    return Outcome("rejected", f"gave up after {attempts} attempts: {exc}")
                error = exc
            except (httpx.TransportError, KafkaError, KeyError) as exc:
                error = exc  # server or broker unreachable, or no version served yet: wait, do not count
            REQUEST_RETRIES.inc()
            log.warning("prompt %s: %s; retrying in %.0fs", env.value.id, error, backoff)
            if self._halt.wait(backoff) or self.stop.is_set():
                return Outcome("abandoned")
            backoff = min(backoff * 2, self.max_backoff_s)

    # -- loop side -----------------------------------------------------------------------------------
    def _harvest(self) -> None:
        """Dead-letter rejected prompts and commit each partition through its durable prefix."""
        self._orphan_old_topic()
        commits: dict[TopicPartition, OffsetAndMetadata] = {}
        assigned = self.inbox.consumer.assignment()
        for tp in assigned | set(self._pending):
            queue = self._pending.get(tp, deque())
            while queue and queue[0][1].done() and tp not in self._blocked:
                env, future = queue.popleft()
                if self._settle(env, future).status == "abandoned":
                    self._blocked.add(tp)
                    queue.appendleft((env, future))
            if not queue:
                self._pending.pop(tp, None)
            if tp in self._blocked or tp not in assigned:
                continue
            # Everything before the first pending prompt is done. Invalid records, which the Inbox
            # dead-lettered, have no envelope: with nothing pending, commit up to the position.
            upto = queue[0][0].offset if queue else self.inbox.consumer.position(tp, timeout_ms=1000)
            if upto is not None and upto > self._committed.get(tp, -1):
                commits[tp] = OffsetAndMetadata(upto, "", -1)
        self._commit(commits)

    def _orphan_old_topic(self) -> None:
        """The inbox found its topic recreated (a broker restart) and reads the new one from its start: the
        prompts read before still finish (a rejected one is dead-lettered), but their offsets name the old
        topic, so they leave the commit queues, and what was committed there counts for nothing."""
        if self.inbox.rewinds != self._rewinds:
            self._rewinds = self.inbox.rewinds
            self._orphans += [entry for queue in self._pending.values() for entry in queue]
            self._pending.clear()
            self._committed.clear()
            self._blocked.clear()
        still = []
        for env, future in self._orphans:
            if future.done():
                self._settle(env, future)
            else:
                still.append((env, future))
        self._orphans = still

    def _settle(self, env: Envelope[PromptEvent], future: Future) -> Outcome:
        """A finished prompt's outcome; a rejected one is dead-lettered."""
        outcome = self._outcome(env, future)
        if outcome.status == "rejected":
            PROMPTS_REJECTED.inc()
            self.inbox.reject(env, outcome.reason)
        return outcome

    def _outcome(self, env: Envelope[PromptEvent], future: Future) -> Outcome:
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop; the prompt goes to the DLQ
            log.exception("prompt %s failed", env.value.id)
            return Outcome("rejected", f"internal error: {exc!r}")

    def _flow_control(self, full: bool) -> None:
        consumer = self.inbox.consumer
        if full:
            consumer.pause(*consumer.assignment())
        elif consumer.paused():
            consumer.resume(*consumer.paused())

    def _commit(self, commits: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if not commits or not self.inbox.group_id:
            return
        try:
            self.inbox.consumer.commit(commits)
        except KafkaError as exc:  # a rebalance: the new owner replays from the last commit
            log.warning("commit failed (%s); prompts after the last commit may be sampled again", exc)
            return
        for tp, om in commits.items():
            self._committed[tp] = om.offset

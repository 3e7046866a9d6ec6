"""The judge process: odpo.candidates (or odpo.feedback) -> preference pairs on odpo.preferences.

Each poll's events are judged, their pairs produced and flushed, and only
then are the offsets committed, so a crash replays events rather than losing
them. Replays give the same deterministic pair ids, which a bounded seen-ids
cache drops (and the trainer's ledger would skip). Input the judge cannot use
(an invalid message, a task no rule knows, feedback without texts) is
dead-lettered with the reason and the loop goes on; the judge never stops on
input. When the judge itself cannot work (the LLM endpoint is down), the
batch is put back (seek to its first unjudged event, nothing dead-lettered)
and tried again after `retry_wait_s`.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from kafka import KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from judge import metrics as M
from judge.base import Judge, JudgeUnavailable
from judge.registry import make_judge
from judge.feedback import FeedbackPairer
from judge.pairs import PairPolicy, build_pairs, repair_pair
from judge.seen import SeenIds
from core.bus import Envelope, Inbox, configure_kafka, make_producer, send
from core.contracts import (
    TOPIC_CANDIDATES,
    TOPIC_FEEDBACK,
    TOPIC_PREFERENCES,
    CandidateSet,
    Feedback,
    PreferencePair,
)
from core.runtime import serve_metrics
from core.settings import CommonSettings, JudgeSettings
from core.topics import group_name, topic_name

log = logging.getLogger(__name__)

COMPONENT = "judge"


class _Outbox:
    """Publishes each pair id once (seen-ids cache), confirms before anything is committed."""

    def __init__(self, producer: KafkaProducer, seen: SeenIds):
        self.producer, self.seen = producer, seen
        self._pending: list[tuple[object, PreferencePair]] = []

    def send(self, pairs: list[PreferencePair]) -> None:
        for pair in pairs:
            if not self.seen.add(pair.id):
                M.DROPPED.labels("duplicate").inc()
                continue
            future = send(self.producer, topic_name(TOPIC_PREFERENCES), pair.prompt.id, pair.to_bytes())
            self._pending.append((future, pair))

    def confirm(self) -> None:
        """Flush and wait for every pair sent; on failure forget their ids (they will be sent again) and raise."""
        pending, self._pending = self._pending, []
        self.producer.flush()
        try:
            for future, _ in pending:
                future.get(timeout=30)
        except Exception:
            for _, pair in pending:
                self.seen.forget(pair.id)
            raise
        for _, pair in pending:
            M.observe_pair(pair.judge, pair.chosen, pair.rejected)


class _Loop:
    """Poll -> handle -> confirm -> commit, with put-back on failure; subclasses handle one event."""

    def __init__(self, inbox: Inbox, producer: KafkaProducer, settings: JudgeSettings,
                 stop: threading.Event | None = None):
        self.inbox, self.producer, self.settings = inbox, producer, settings
        self.stop = stop or threading.Event()
        self.outbox = _Outbox(producer, SeenIds(settings.seen_ids_cache))

    def step(self) -> int:
        """Handle one poll's worth of messages; returns how many valid events were handled."""
        dead_before = self.inbox.dead_lettered
        envs = self.inbox.poll(timeout_ms=int(self.settings.poll_timeout_s * 1000))
        done, unavailable = 0, False
        deadline = time.monotonic() + self.settings.max_batch_seconds
        try:
            for env in envs:
                if done and time.monotonic() > deadline:
                    # Poll again before the group's max poll interval runs out: a consumer that overruns it is
                    # evicted, its commit fails and the whole batch is judged again, forever on a slow machine.
                    break
                self.handle(env)
                done += 1
        except JudgeUnavailable as exc:
            unavailable = True
            M.UNAVAILABLE.inc()
            log.warning("judge unavailable, retrying %d event(s) in %.1f s: %s", len(envs) - done,
                        self.settings.retry_wait_s, exc)
        try:
            self.outbox.confirm()
        except Exception:
            self._put_back(envs)
            raise
        M.DEAD_LETTERS.inc(self.inbox.dead_lettered - dead_before)
        housekept = self.after_poll()
        if done < len(envs):
            self.inbox.commit(envs[:done])
            self._put_back(envs[done:])
            if unavailable:
                self.stop.wait(self.settings.retry_wait_s)
        elif envs or self.inbox.dead_lettered > dead_before or housekept:
            self.commit()
        return done

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except KafkaError as exc:  # the broker, not the input: wait and go on from the committed offsets
                log.warning("broker error, retrying in %.1f s: %s", self.settings.retry_wait_s, exc)
                self.stop.wait(self.settings.retry_wait_s)

    def handle(self, env: Envelope) -> None:
        raise NotImplementedError

    def after_poll(self) -> bool:
        """Housekeeping after each poll; True when it changed what may be committed."""
        return False

    def commit(self) -> None:
        # Everything polled is handled (confirmed or dead-lettered): commit it all, the dead-lettered
        # records included, so a restart does not dead-letter them again.
        self.inbox.commit()

    def _put_back(self, envs: list[Envelope]) -> None:
        """Seek each partition back to its first unhandled event, so the next poll reads it again."""
        first: dict[TopicPartition, int] = {}
        for env in envs:
            tp = TopicPartition(env.topic, env.partition)
            first[tp] = min(first.get(tp, env.offset), env.offset)
        for tp, offset in first.items():
            self.inbox.consumer.seek(tp, offset)

    def reject(self, env: Envelope, reason: str) -> None:
        self.inbox.reject(env, reason)


class JudgeLoop(_Loop):
    """Candidate sets -> scores (the configured plugin) -> pairs."""

    def __init__(self, inbox: Inbox[CandidateSet], producer: KafkaProducer, settings: JudgeSettings,
                 judge: Judge | None = None, stop: threading.Event | None = None):
        super().__init__(inbox, producer, settings, stop)
        self.judge = judge or make_judge(settings)
        self.policy = PairPolicy.from_settings(settings)

    def handle(self, env: Envelope[CandidateSet]) -> None:
        cset, name = env.value, self.judge.name
        start = time.perf_counter()
        try:
            judgement = self.judge.judge(cset.prompt, [c.text for c in cset.completions])
            if len(judgement.scores) != len(cset.completions) or not all(map(math.isfinite, judgement.scores)):
                raise ValueError(f"scores {judgement.scores} are not one finite number per completion")
            pairs, dropped = build_pairs(cset, judgement, name, self.policy)
            if self.settings.repair_pairs:
                fixed, why = repair_pair(cset, judgement, self.judge, self.policy)
                pairs += [fixed] if fixed else []
                dropped += [why] if why else []
        except JudgeUnavailable:
            raise  # put back, counted when judged
        except ValueError as exc:
            M.CANDIDATE_SETS.inc()
            self.reject(env, f"{name} judge cannot score prompt {cset.prompt.id!r}: {exc}")
            return
        except Exception as exc:  # a judge bug on one message must not stall the partition forever
            M.CANDIDATE_SETS.inc()
            log.exception("judge failed on %s[%d]@%d", env.topic, env.partition, env.offset)
            self.reject(env, f"{name} judge failed: {type(exc).__name__}: {exc}")
            return
        M.CANDIDATE_SETS.inc()
        M.LATENCY.labels(name).observe(time.perf_counter() - start)
        for s in judgement.scores:
            M.SCORES.labels(name).observe(s)
        M.POLICY_VERSION.set(cset.policy_version)
        for reason in dropped:
            M.DROPPED.labels(reason).inc()
        for failure in judgement.failures or ():
            if failure is not None:
                M.GUARD_FAILURES.labels(failure).inc()
        log.debug("prompt %s v%d: %d pair(s), dropped %s, scores %s", cset.prompt.id, cset.policy_version,
                  len(pairs), dropped, judgement.scores)
        self.outbox.send(pairs)


class FeedbackLoop(_Loop):
    """Client feedback (odpo.feedback) -> pairs; ratings wait in a bounded buffer for an opposite rating."""

    def __init__(self, inbox: Inbox[Feedback], producer: KafkaProducer, settings: JudgeSettings,
                 stop: threading.Event | None = None):
        super().__init__(inbox, producer, settings, stop)
        self.pairer = FeedbackPairer(settings.feedback_max_prompts, settings.feedback_max_per_prompt,
                                     settings.feedback_max_age_s, settings.min_margin)

    def handle(self, env: Envelope[Feedback]) -> None:
        fb = env.value
        M.FEEDBACK.labels("choice" if fb.other_response_id is not None else "rating").inc()
        start = time.perf_counter()
        try:
            pairs, dropped = self.pairer.add(fb, env.partition, env.offset)
        except ValueError as exc:
            self.reject(env, f"human judge cannot use feedback on {fb.response_id!r}: {exc}")
            return
        except Exception as exc:  # a bug on one message must not stall the partition forever
            log.exception("feedback failed on %s[%d]@%d", env.topic, env.partition, env.offset)
            self.reject(env, f"human judge failed: {type(exc).__name__}: {exc}")
            return
        M.LATENCY.labels("human").observe(time.perf_counter() - start)
        for reason in dropped:
            if reason in ("neutral", "evicted"):
                M.FEEDBACK_UNPAIRED.labels(reason).inc()
            else:
                M.DROPPED.labels(reason).inc()
        self.outbox.send(pairs)
        M.FEEDBACK_BUFFERED.set(len(self.pairer))

    def after_poll(self) -> bool:
        evicted = self.pairer.evict_old()
        if evicted:
            M.FEEDBACK_UNPAIRED.labels("evicted").inc(evicted)
            M.FEEDBACK_BUFFERED.set(len(self.pairer))
        return evicted > 0

    def commit(self) -> None:
        """Commit what was read, but never past a rating that still waits in the buffer."""
        consumer = self.inbox.consumer
        low = self.pairer.lowest_offsets()
        offsets = {}
        for tp in consumer.assignment():
            pos = consumer.position(tp)
            offsets[tp] = OffsetAndMetadata(min(pos, low.get(tp.partition, pos)), "", -1)
        if offsets:
            consumer.commit(offsets)


def _reference_model(common: CommonSettings, settings: JudgeSettings):
    """The base model folder the guard's fluency term needs, or None when it is off."""
    if not settings.reference_logprob or settings.composition == "rules_only":
        return None
    from core.assets import base_model_dir

    return base_model_dir(common.cache_dir, common.base_model)


def run(common: CommonSettings, settings: JudgeSettings, stop: threading.Event) -> None:
    """Judge candidate sets (or, with judge=human, feedback) until `stop` is set."""
    from core.errors import UsageError

    configure_kafka(common)
    human = settings.judge == "human"
    try:
        judge = None if human else make_judge(settings, _reference_model(common, settings))
    except (ValueError, OSError, RuntimeError) as exc:  # a plugin (or its reference model) cannot start: a wrong setting
        raise UsageError(f"judge {settings.judge}: {exc}") from None
    topic, model = (topic_name(TOPIC_FEEDBACK), Feedback) if human else (topic_name(TOPIC_CANDIDATES), CandidateSet)
    group = settings.feedback_group_id if human else settings.group_id
    port = serve_metrics(settings.metrics_port, common.metrics_host)
    log.info("judge %r: %s -> %s, group %s, metrics on :%d", settings.judge, topic, topic_name(TOPIC_PREFERENCES),
             group_name(group), port)
    producer = make_producer(common.bootstrap_servers)
    inbox = None
    try:
        inbox = Inbox(common.bootstrap_servers, topic, model, COMPONENT, producer, group_id=group,
                      max_poll_records=settings.max_poll_records)
        loop = FeedbackLoop(inbox, producer, settings, stop) if human else \
            JudgeLoop(inbox, producer, settings, judge, stop)
        loop.run()
    finally:
        if inbox is not None:
            inbox.close()
        producer.close()
        if hasattr(judge, "close"):
            judge.close()
        log.info("judge stopped")

"""The judge process: odpo.candidates -> scores -> odpo.preferences (bad input -> odpo.dlq).

Each poll's candidate sets are scored, their pairs produced and flushed, and
only then are the offsets committed, so a crash replays sets rather than
losing them (replayed pairs get the same deterministic id and the trainer
skips ids it has trained). A set the judge cannot score (a task of another
kind, malformed constraints) is dead-lettered with the reason and the loop
goes on; so is a message that is not a valid CandidateSet (by the Inbox).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from kafka import KafkaProducer
from prometheus_client import Counter, Gauge, Histogram

from judge import verifier
from judge.pairs import DROP_REASONS, make_pair
from service.bus import Envelope, Inbox, make_producer
from service.contracts import TOPIC_CANDIDATES, TOPIC_PREFERENCES, CandidateSet
from service.runtime import serve_metrics
from service.settings import CommonSettings, JudgeSettings

log = logging.getLogger(__name__)

COMPONENT = "judge"

# A judge plugin maps (task metadata, response text) to a score in [0, 1] and raises ValueError
# for tasks it cannot judge.
JUDGES: dict[str, Callable[[dict[str, Any], str], float]] = {"verifier": verifier.score}

CANDIDATE_SETS = Counter("odpo_judge_candidate_sets_total", "Valid candidate sets received.")
PAIRS = Counter("odpo_judge_pairs_total", "Preference pairs published to odpo.preferences.")
DROPPED = Counter("odpo_judge_pairs_dropped_total", "Candidate sets that gave no pair, by reason.", ["reason"])
DEAD_LETTERS = Counter("odpo_judge_dead_letters_total", "Messages sent to odpo.dlq (invalid or unjudgeable).")
SCORES = Histogram("odpo_judge_score", "Score of each sampled completion.",
                   buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)))
LATENCY = Histogram("odpo_judge_latency_seconds", "Time to score one candidate set and build its pair.",
                    buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0))
POLICY_VERSION = Gauge("odpo_judge_policy_version", "Policy version of the last candidate set judged.")
for _reason in DROP_REASONS:
    DROPPED.labels(_reason)  # export zeros, so rate() works before the first drop


class JudgeLoop:
    """One consumer's judge loop; `step()` is one poll -> score -> produce -> flush -> commit cycle."""

    def __init__(self, inbox: Inbox[CandidateSet], producer: KafkaProducer, settings: JudgeSettings):
        self.inbox, self.producer, self.settings = inbox, producer, settings
        self.judge = JUDGES[settings.judge]

    def step(self) -> int:
        """Handle one poll's worth of messages; returns how many valid candidate sets it saw."""
        dead_before = self.inbox.dead_lettered
        envs = self.inbox.poll(timeout_ms=int(self.settings.poll_timeout_s * 1000))
        futures = [f for env in envs if (f := self._judge(env)) is not None]
        self.producer.flush()
        for f in futures:
            f.get(timeout=30)  # raises if a pair was not written: then nothing is committed
        dead = self.inbox.dead_lettered - dead_before
        if dead:
            DEAD_LETTERS.inc(dead)
        if envs or dead:
            # Everything polled is handled (produced, flushed or dead-lettered): commit it all,
            # the dead-lettered records included, so a restart does not dead-letter them again.
            self.inbox.commit()
        return len(envs)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def _judge(self, env: Envelope[CandidateSet]):
        """Score one set and send its pair; returns the send future, or None when nothing was sent."""
        cset = env.value
        CANDIDATE_SETS.inc()
        start = time.perf_counter()
        try:
            scores = [self.judge(cset.prompt.task, c.text) for c in cset.completions]
            pair, reason = make_pair(cset, scores, self.settings.judge, self.settings.min_margin)
        except ValueError as exc:
            self.inbox.reject(env, f"{self.settings.judge} judge cannot score prompt {cset.prompt.id!r}: {exc}")
            return None
        except Exception as exc:  # a judge bug on one message must not stall the partition forever
            log.exception("judge failed on %s[%d]@%d", env.topic, env.partition, env.offset)
            self.inbox.reject(env, f"{self.settings.judge} judge failed: {type(exc).__name__}: {exc}")
            return None
        for s in scores:
            SCORES.observe(s)
        POLICY_VERSION.set(cset.policy_version)
        LATENCY.observe(time.perf_counter() - start)
        if pair is None:
            DROPPED.labels(reason).inc()
            log.debug("prompt %s v%d: no pair (%s), scores %s", cset.prompt.id, cset.policy_version, reason, scores)
            return None
        PAIRS.inc()
        log.debug("prompt %s v%d: pair %s margin %.3f", cset.prompt.id, cset.policy_version, pair.id, pair.margin)
        return self.producer.send(TOPIC_PREFERENCES, key=cset.prompt.id.encode(), value=pair.to_bytes())


def run(common: CommonSettings, settings: JudgeSettings, stop: threading.Event) -> None:
    """Judge candidate sets until `stop` is set."""
    port = serve_metrics(settings.metrics_port, common.metrics_host)
    log.info("judge %r: %s -> %s, group %s, metrics on :%d", settings.judge, TOPIC_CANDIDATES, TOPIC_PREFERENCES,
             settings.group_id, port)
    producer = make_producer(common.bootstrap_servers)
    inbox: Inbox[CandidateSet] | None = None
    try:
        inbox = Inbox(common.bootstrap_servers, TOPIC_CANDIDATES, CandidateSet, COMPONENT, producer,
                      group_id=settings.group_id)
        JudgeLoop(inbox, producer, settings).run(stop)
    finally:
        if inbox is not None:
            inbox.close()
        producer.close()
        log.info("judge stopped")

"""The trainer service: odpo.preferences -> rolling DPO updates -> policy-v<N> in the store -> odpo.adapters.

Per window: archive every valid pair (trainer/archive.py), buffer them
(dropping, and counting, pairs already in the ledger, stale ones and ones from
a version the trainer never made; pairs that cannot be tokenized go to
odpo.dlq), train once `window_pairs` are buffered or `window_seconds` passed,
write version N+1, record its `AdapterReady` in the store (the manifest: the
store is the record of versions), publish it on Kafka (flushed), note that in
the store, commit offsets (after the archive is fsynced; never while it is
failing), then apply store retention (trainer/retention.py). Kafka offsets are
per-partition high-water marks, so what is committed is the lowest offset
still buffered (or the read position when nothing is), i.e. the window's
pairs and everything dropped before them, never a pair that is still waiting.

Stopping (SIGTERM): the window under way finishes (or is abandoned,
uncommitted), then whatever the topic still holds for the group is archived,
untrained and uncommitted, for up to `STOP_ARCHIVE_S`: odpo up's memory-only
broker stops with the run, and the pairs published during the last window
would be lost with it. The next run reads them again.

Crashes: a killed trainer resumes from the newest complete version; replayed
pairs already in its ledger are dropped as duplicates, so none trains twice.
At start the trainer always announces its newest version again (writing its
manifest first when the store has none, e.g. one from before manifests):
`odpo.adapters` may have lost it (retention, a new cluster, a restarted
memory-only broker), and a generator that never hears of it samples with an
old version whose pairs are all stale. `odpo_trainer_adapters_republished_total`
counts the restarts whose newest version had never been announced at all.

Settings beyond the update itself: `keep_versions` (retention),
`archive_rotate_mb` (pair archive), `stuck_consumer_s` (exit when offset
commits keep failing, so the supervisor restarts the trainer) and `report_to`
(experiment trackers that get each published window's metrics under their
/metrics names, trainer/tracking.py), in core/settings.py.

Training runs in a worker thread while this thread keeps polling the paused
consumer: a window takes longer than the group's max poll interval (10 s, the
setting that lets groups join on Tansu), and a consumer that stops polling is
thrown out of its group and can no longer commit.

Under torchrun (trainer/distributed.py) rank 0 runs all of the above alone
(Kafka, archive, store, ledger, /metrics) and sends each window to the other
ranks, which only train their shards of it (`follow`); a dead rank makes the
others' collectives fail or time out (`dist_timeout_s`), every rank exits
non-zero, and the restarted group resumes from the store as one trainer would.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from core.adapter_store import (
    adapter_digest,
    mark_published,
    published_version,
    read_manifest,
    version_path,
    write_manifest,
)
from core.assets import base_model_dir
from core.bus import Envelope, Inbox, configure_kafka, ensure_topics, make_producer, publish
from core.contracts import (
    DATASET_JUDGE,
    TOPIC_ADAPTERS,
    TOPIC_PREFERENCES,
    AdapterReady,
    PreferencePair,
    TrainMetrics,
    version_name,
)
from core.runtime import serve_metrics
from core.settings import CommonSettings, TrainerSettings
from core.topics import topic_name
from trainer import metrics as M
from trainer.archive import PairArchive
from trainer.checkpoint import recipe_settings, remove_staging_leftovers
from trainer.distributed import SOLO, STOP, Ranks, follow, lead_window
from trainer.recipe import Trainer, WindowResult
from trainer.retention import prune_store, store_usage
from trainer.tokenize import TokenizedPair, UntrainablePair
from trainer.tracking import Tracker, open_tracker

log = logging.getLogger(__name__)

COMPONENT = "trainer"
STOP_ARCHIVE_S = 10.0  # how long a stopping trainer reads the topic on to archive what is still there


@dataclass
class _Buffered:
    env: Envelope[PreferencePair]
    pair: TokenizedPair


class TrainerLoop:
    """Buffers pairs from an Inbox and turns full windows into published versions."""

    def __init__(self, trainer: Trainer, inbox: Inbox[PreferencePair], producer, common: CommonSettings,
                 settings: TrainerSettings, stop: threading.Event, ranks: Ranks = SOLO,
                 tracker: Tracker | None = None):
        self.trainer, self.inbox, self.producer, self.ranks = trainer, inbox, producer, ranks
        self.tracker = tracker or Tracker([], "", {})
        self.common, self.settings, self.stop = common, settings, stop
        self.buffer: list[_Buffered] = []
        self.opened_at: float | None = None
        self._uncommitted = False
        self._commit_failing_since: float | None = None
        self.archive = PairArchive(common.store_dir, int(settings.archive_rotate_mb * (1 << 20)))
        M.POLICY_VERSION.set(trainer.version)

    # -- intake ---------------------------------------------------------------------------------
    def admit(self, env: Envelope[PreferencePair]) -> None:
        M.PAIRS_CONSUMED.inc()
        self._uncommitted = True
        pair = env.value
        self.archive.add(pair)  # whatever becomes of it; made durable before the next offset commit
        reason = self._drop_reason(pair)
        if reason is None:
            try:
                tokenized = self.trainer.tokenize(pair)
            except UntrainablePair as exc:
                self.inbox.reject(env, f"untrainable pair: {exc}")
                reason = "untrainable"
        if reason is not None:
            M.PAIRS_DROPPED.labels(reason).inc()
            log.debug("dropped pair %s: %s", pair.id, reason)
            return
        staleness = self._staleness(pair)
        if staleness is not None:
            M.STALENESS.observe(staleness)
        if not self.buffer:
            self.opened_at = time.monotonic()
        self.buffer.append(_Buffered(env, tokenized))
        M.BUFFERED.set(len(self.buffer))

    def _drop_reason(self, pair: PreferencePair) -> str | None:
        if self.trainer.already_trained(pair.id) or any(b.pair.pair_id == pair.id for b in self.buffer):
            return "duplicate"
        staleness = self._staleness(pair)
        if staleness is not None and staleness < 0:
            return "future_version"  # sampled by a lineage this store never produced
        if staleness is not None and staleness > self.settings.max_staleness:
            return "stale"
        return None

    def _staleness(self, pair: PreferencePair) -> int | None:
        """Versions between the pair's sampler and this trainer; None where that does not apply."""
        if pair.judge == DATASET_JUDGE and not self.settings.stale_dataset_pairs:
            return None
        return self.trainer.version - pair.policy_version

    def window_ready(self) -> bool:
        if len(self.buffer) >= self.settings.window_pairs:
            return True
        waited = time.monotonic() - self.opened_at if self.opened_at is not None else 0.0
        return bool(self.buffer) and self.settings.window_seconds > 0 and waited >= self.settings.window_seconds

    # -- one loop turn --------------------------------------------------------------------------
    def tick(self, timeout_ms: int = 500) -> None:
        for env in self.inbox.poll(timeout_ms=timeout_ms):
            self.admit(env)
        if self.window_ready():
            self.update()
        elif not self.buffer and self._uncommitted:
            self.commit()  # only drops and dead letters since the last commit: move past them
        self.ranks.keepalive()

    def update(self) -> WindowResult | None:
        """Train the oldest `window_pairs` buffered pairs; publish and commit when the update is sound."""
        window, self.buffer = self.buffer[: self.settings.window_pairs], self.buffer[self.settings.window_pairs :]
        self.opened_at = time.monotonic() if self.buffer else None
        result, late = self._train_while_polling([b.pair for b in window])
        if result is None or result.aborted:
            self.buffer = window + self.buffer  # stopping: leave them uncommitted for the next run
            for env in late:  # ... and archive the pairs read meanwhile (a memory-only broker dies with the run)
                self.admit(env)
            return result
        M.record_window(result)
        if result.publishable:
            self._publish(window, result)
        else:
            M.WINDOWS.labels("nonfinite").inc()
            for b in window:  # never lose a message silently: say why these pairs taught nothing
                self.inbox.reject(b.env, f"not trained: non-finite loss/gradient in all {result.skipped} steps"
                                  if not result.restored else "not trained: the update made the weights non-finite")
                M.PAIRS_DROPPED.labels("nonfinite").inc()
            self.commit()
        self._drop_newly_stale()
        for env in late:  # after the ledger took the window's ids, so a replayed copy counts as a duplicate
            self.admit(env)
        M.BUFFERED.set(len(self.buffer))
        return result

    def archive_backlog(self, budget_s: float = STOP_ARCHIVE_S) -> int:
        """On the way out: archive what the topic still holds for this group (read until a poll comes back empty,
        within `budget_s`) without training or committing it, so the next run reads it again. A memory-only broker
        (odpo up's) ends with the run: without this, pairs published during the last window would be lost.
        Returns how many pairs were read."""
        deadline, read = time.monotonic() + budget_s, 0
        while time.monotonic() < deadline:
            envs = self.inbox.poll(timeout_ms=500)
            if not envs:
                break
            for env in envs:
                self.archive.add(env.value)
            read += len(envs)
        if read:
            synced = self.archive.sync()
            log.info("stopping: archived %d pair(s) still on %s, untrained and uncommitted%s", read,
                     topic_name(TOPIC_PREFERENCES), "" if synced else " (the archive's write failed: they stay on the topic only)")
        return read

    def _publish(self, window: list[_Buffered], result: WindowResult) -> None:
        t0 = time.perf_counter()
        offsets = self.commit_positions()
        ckpt = self.trainer.publish_version(self.common.store_dir, [b.pair.pair_id for b in window], result,
                                            {f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()})
        state = self.trainer.state
        M.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
        ready = AdapterReady(version=state.version, path=ckpt.path.name, sha256=ckpt.sha256,
                             base_model=self.trainer.policy.base_model, parent_version=state.parent_version,
                             pairs_trained=state.pairs_trained, metrics=result.train_metrics())
        write_manifest(self.common.store_dir, ready)  # the record first: a component behind reads it there
        publish(self.producer, topic_name(TOPIC_ADAPTERS), version_name(state.version), ready)
        mark_published(self.common.store_dir, state.version)
        self.commit(offsets)
        self.apply_retention()
        M.WINDOWS.labels("published").inc()
        M.PAIRS_TRAINED.inc(len(window))
        M.POLICY_VERSION.set(state.version)
        M.record_published(result)
        self.tracker.log_window(state.version, M.tracked_values(result, state.version, state.pairs_trained))
        log.info("published %s: %d pairs, %d steps (%d skipped) in %.1fs, loss %.4f -> %.4f, margin %.4f",
                 ckpt.path.name, len(window), result.steps, result.skipped, result.seconds, result.loss_first,
                 result.loss, result.reward_margin)

    def announce_newest(self) -> AdapterReady | None:
        """At start: publish the newest version's AdapterReady again (None at version 0).

        Its manifest is the message; one missing (a store from before manifests, or a crash between the
        rename and the manifest) or naming another digest (a folder rewritten since) is written first.
        """
        store, version = self.common.store_dir, self.trainer.version
        if version == 0:
            return None
        folder = version_path(store, version)
        digest = adapter_digest(folder)
        ready = read_manifest(store, version)
        if ready is None or ready.sha256 != digest:
            state = self.trainer.state
            ready = AdapterReady(version=version, path=folder.name, sha256=digest,
                                 base_model=self.trainer.policy.base_model, parent_version=state.parent_version,
                                 pairs_trained=state.pairs_trained, metrics=_stored_metrics(state.metrics))
            write_manifest(store, ready)
        never_announced = published_version(store) < version
        publish(self.producer, topic_name(TOPIC_ADAPTERS), version_name(version), ready)
        mark_published(store, version)
        if never_announced:
            M.REPUBLISHED.inc()
            log.warning("announced %s: it was stored but its AdapterReady never went out", folder.name)
        else:
            log.info("re-announced %s, the newest version, at start", folder.name)
        return ready

    def apply_retention(self) -> list[int]:
        """Delete the versions nobody needs (trainer/retention.py) and export the store's size."""
        store = self.common.store_dir
        deleted = prune_store(store, self.settings.keep_versions)
        M.VERSIONS_DELETED.inc(len(deleted))
        for part, size in store_usage(store).items():
            M.STORE_BYTES.labels(part).set(size)
        return deleted

    def _train_while_polling(self, pairs: list[TokenizedPair]) -> tuple[WindowResult | None, list[Envelope]]:
        """Train in a worker thread; poll the paused consumer meanwhile so the group keeps us."""
        out: dict[str, object] = {}

        def work() -> None:
            try:
                out["result"] = lead_window(self.ranks, self.trainer, pairs, should_stop=self.stop.is_set)
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the polling thread
                out["error"] = exc

        worker = threading.Thread(target=work, name="odpo-trainer-window", daemon=True)
        consumer = self.inbox.consumer
        paused = set(consumer.assignment())
        consumer.pause(*paused)
        worker.start()
        late: list[Envelope[PreferencePair]] = []
        try:
            while worker.is_alive():
                late.extend(self.inbox.poll(timeout_ms=500))  # partitions assigned mid-window are not paused
                worker.join(timeout=0.5)
        finally:
            consumer.resume(*(paused & set(consumer.assignment())))
        if "error" in out:
            raise out["error"]  # type: ignore[misc]
        return out.get("result"), late  # type: ignore[return-value]

    def _drop_newly_stale(self) -> None:
        keep = []
        for b in self.buffer:
            staleness = self._staleness(b.env.value)
            if staleness is not None and staleness > self.settings.max_staleness:
                M.PAIRS_DROPPED.labels("stale").inc()
                self._uncommitted = True
            else:
                keep.append(b)
        self.buffer = keep

    # -- offsets --------------------------------------------------------------------------------
    def commit_positions(self) -> dict[TopicPartition, int]:
        """Per assigned partition: the lowest buffered offset, never past the read position."""
        return self.inbox.commit_positions(b.env for b in self.buffer)

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        """Commit `offsets` (default: `commit_positions`) once every pair read is durable in the archive."""
        offsets = self.commit_positions() if offsets is None else offsets
        if not offsets:
            return
        if not self.archive.sync():  # a pair past these offsets may be missing from it: replay rather than lose
            return
        try:
            self.inbox.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
            self._uncommitted = False
            self._commit_failing_since = None
        except KafkaError as exc:  # e.g. a rebalance: the ledger keeps a replay from training anything twice
            log.warning("offset commit failed (%s); replayed pairs will be deduplicated", exc)
            now = time.monotonic()
            self._commit_failing_since = self._commit_failing_since or now
            stuck_s = self.settings.stuck_consumer_s
            if stuck_s > 0 and now - self._commit_failing_since >= stuck_s:
                raise ConsumerStuck(f"offset commits have failed for {now - self._commit_failing_since:.0f}s "
                                    f"(last: {exc}); exiting so that the supervisor restarts the trainer with a "
                                    "fresh consumer (pairs not committed are replayed; the ledger trains none "
                                    "twice)") from exc


class ConsumerStuck(RuntimeError):
    """The consumer cannot commit for `stuck_consumer_s`: seen after the embedded broker restarted, a
    kafka-python consumer stayed in 'rebalance in progress' for good and took no pair again."""


def _stored_metrics(metrics: dict[str, float]) -> TrainMetrics:
    core = {k: metrics.get(k, math.nan) for k in ("loss", "reward_margin", "reward_accuracy")}
    return TrainMetrics(**core, steps=int(metrics.get("steps", 0)),
                        **{k: v for k, v in metrics.items() if k not in core and k != "steps"})


def run(common: CommonSettings, settings: TrainerSettings, stop: threading.Event) -> None:
    """Consume odpo.preferences and publish rolling LoRA updates until `stop` is set (rank 0 decides, under torchrun)."""
    configure_kafka(common)
    model_dir = base_model_dir(common.cache_dir, common.base_model)
    ranks = Ranks.from_env(settings)
    clean = False
    try:
        if ranks.leader and remove_staging_leftovers(common.store_dir):
            log.warning("removed half-written versions a killed trainer left in %s", common.store_dir)
        trainer = Trainer.open(model_dir, settings, common.store_dir, ranks=ranks)
        if ranks.leader:
            _lead(trainer, common, settings, stop, ranks)
        else:
            follow(ranks, trainer)  # until rank 0 says stop; this rank's own SIGTERM waits for that
        clean = True
    finally:
        ranks.close(clean)


def _lead(trainer: Trainer, common: CommonSettings, settings: TrainerSettings, stop: threading.Event,
          ranks: Ranks) -> None:
    """The trainer with Kafka: the only one of a single process, rank 0 of a torchrun group."""
    tracker = open_tracker(settings, common.store_dir, common.cache_dir, recipe_settings(settings))
    port = serve_metrics(settings.metrics_port, common.metrics_host)
    log.info("trainer at version %d, /metrics on %s:%d", trainer.version, common.metrics_host, port)
    ensure_topics(common.bootstrap_servers)
    producer = make_producer(common.bootstrap_servers)
    inbox = Inbox(common.bootstrap_servers, topic_name(TOPIC_PREFERENCES), PreferencePair, COMPONENT, producer,
                  group_id=settings.group_id)
    loop = TrainerLoop(trainer, inbox, producer, common, settings, stop, ranks, tracker)
    loop.announce_newest()
    try:
        while not stop.is_set():
            loop.tick()
        ranks.send(STOP)
        loop.archive_backlog()
    finally:
        loop.archive.close()
        tracker.close()
        inbox.close()
        producer.close()
        log.info("trainer stopped at version %d", trainer.version)

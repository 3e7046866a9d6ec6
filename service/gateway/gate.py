"""The promotion gate: scores every published version on the held-out prompts before it may become `policy`.

A thread follows `odpo.adapters` from the start (no consumer group: every
gateway replica must see every version) and records each `AdapterReady` in
the `VersionBook`. It scores `base` first, then the newest pending version:
greedy answers from the serving engine for `policy-v<N>` (once vLLM lists it;
loaded from the store if the generator does not), scored by the verifier
judge (`judge.heldout`). The book decides; metrics and the log say why a
version was not promoted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import httpx

from service.bus import Inbox, make_producer
from service.contracts import TOPIC_ADAPTERS, AdapterReady, version_name
from service.gateway.book import VersionBook
from service.gateway.engine import EngineAdapters, NotServable
from service.gateway.metrics import EVAL_SECONDS, PROMOTIONS, REFUSALS, ScoreGauge, sync_promoted
from service.settings import GatewaySettings
from service.task import make_prompts

log = logging.getLogger(__name__)

COMPONENT = "gateway"


class PromotionGate:
    def __init__(self, book: VersionBook, adapters: EngineAdapters, settings: GatewaySettings, bootstrap: str,
                 scores: ScoreGauge):
        self.book, self.adapters, self.settings, self.bootstrap, self.scores = (
            book, adapters, settings, bootstrap, scores)
        self.prompts = make_prompts("heldout", settings.heldout_prompts)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odpo-gateway-gate", daemon=True)
        self._inbox: Inbox[AdapterReady] | None = None
        self._producer = None
        self._next_connect = 0.0
        self._engine_down = False  # logged once per outage, not every retry

    def start(self) -> PromotionGate:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=15)
        for close in (self._inbox and self._inbox.close, self._producer and self._producer.close):
            if close:
                with contextlib.suppress(Exception):  # shutting down: a broken connection is gone either way
                    close()

    # -- the loop ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                self._read_adapters()
                version, superseded = self.book.next_evaluation()
                if superseded:
                    REFUSALS.labels("superseded").inc(len(superseded))
                    log.info("not scoring %s: a newer version is waiting", ", ".join(map(version_name, superseded)))
                if version is None:
                    if self._inbox is None:
                        self._halt.wait(0.5)
                    continue
                self._evaluate(version)
            except Exception:
                log.exception("promotion gate error")
                self._halt.wait(2)

    def _read_adapters(self) -> None:
        if self._inbox is None:
            if time.monotonic() < self._next_connect:
                return
            try:
                self._producer = make_producer(self.bootstrap)
                self._inbox = Inbox(self.bootstrap, TOPIC_ADAPTERS, AdapterReady, COMPONENT, self._producer,
                                    group_id=None)
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds; retry later
                log.warning("gate: broker %s unreachable (%s); retrying", self.bootstrap, exc.__class__.__name__)
                self._next_connect = time.monotonic() + 5
                return
        for env in self._inbox.poll(timeout_ms=200):
            if self.book.add(env.value):
                log.info("gate: %s published (parent v%d, %d pairs); waiting to be scored",
                         version_name(env.value.version), env.value.parent_version, env.value.pairs_trained)

    # -- scoring one version -------------------------------------------------------------------------
    def _evaluate(self, version: int) -> None:
        name = version_name(version)
        try:
            if not self._make_servable(version):
                self.book.requeue(version)
                self._halt.wait(1)
                return
            if self._engine_down:
                log.info("gate: serving engine reachable again")
                self._engine_down = False
            started = time.monotonic()
            score = self._score(version)
            EVAL_SECONDS.observe(time.monotonic() - started)
        except NotServable as exc:
            self._failed(version, f"cannot be served: {exc}", "not_servable")
            return
        except httpx.TransportError as exc:  # the engine is (re)starting: not a verdict on the version
            if not self._engine_down:
                log.warning("gate: serving engine unreachable while scoring %s (%s); retrying", name, exc)
            self._engine_down = True
            self.book.requeue(version)
            self._halt.wait(2)
            return
        except httpx.HTTPError as exc:
            self._failed(version, f"scoring failed: {exc}", "eval_failed")
            return
        if self._halt.is_set():
            self.book.requeue(version)
            return
        decision = self.book.decide(version, score)
        self.scores.set(version, score)
        if decision.promoted:
            PROMOTIONS.labels("gate").inc()
            log.info("gate: promoted %s (held-out score %.4f; %s had %s)", name, score,
                     version_name(decision.previous), _fmt(self.book.record(decision.previous).score))
        elif version != decision.previous:
            REFUSALS.labels("pinned" if "pinned" in decision.reason else decision.status).inc()
            log.warning("gate: %s not promoted (%s): %s", name, decision.status, decision.reason)
        else:
            log.info("gate: %s (promoted) scores %.4f on %d held-out prompts", name, score, len(self.prompts))
        sync_promoted(self.book)
        self.adapters.release({self.book.promoted})

    def _make_servable(self, version: int) -> bool:
        """True once the engine serves `version`; False to try again later (`base` not registered yet)."""
        if version == 0:
            return 0 in self.adapters.listed()
        if not self.adapters.wait_listed(version, self.settings.load_wait_s, self._halt):
            rec = self.book.record(version)
            if rec is None:
                raise NotServable("forgotten")
            self.adapters.ensure(rec)
        return True

    def _score(self, version: int) -> float:
        # The held-out evaluation and the verifier live with the judge; they use HTTP and plain Python only.
        from judge.heldout import evaluate_heldout

        s = self.settings
        for attempt in (1, 2):
            try:
                return evaluate_heldout(s.vllm_url, version_name(version), self.prompts, s.eval_max_tokens,
                                        concurrency=s.eval_concurrency, timeout_s=s.request_timeout_s).mean_score
            except httpx.HTTPStatusError as exc:  # the generator unloaded it mid-way: load it and start over
                if exc.response.status_code != 404 or attempt == 2:
                    raise
                self.adapters.ensure(self.book.record(version))
        raise AssertionError("unreachable")

    def _failed(self, version: int, reason: str, kind: str) -> None:
        self.book.fail(version, reason)
        if version != self.book.promoted:
            REFUSALS.labels(kind).inc()
        log.warning("gate: %s not promoted: %s", version_name(version), reason)
        sync_promoted(self.book)
        self.adapters.release({self.book.promoted})
        if version == self.book.promoted:
            self._halt.wait(5)  # it is scored again next: do not spin on a failing engine


def _fmt(score: float | None) -> str:
    return "no score" if score is None else f"{score:.4f}"

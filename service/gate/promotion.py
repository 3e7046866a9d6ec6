"""The promotion gate: scores every published version on the held-out prompts before it may become `policy`.

A thread follows `odpo.adapters` from the start (no consumer group) and
records each `AdapterReady` in the `VersionBook`. It decides only while its
gate writes the registry (service/gate/control.py), which the gateway
replicas copy. The adapter store is the record, the topic only the fast
path: at start and every `store_check_s` the gate also records the store's
announced versions newer than any it knows, so a topic that lost messages (a
new broker, retention) does not hide versions from it. It scores `base` first,
then the newest pending version (if that one cannot be scored, the ones it
superseded wait again):
greedy answers from the serving engine for `policy-v<N>` (once vLLM lists it;
loaded from the store if the generator does not), one evaluation row per
prompt (judge/signals.py: task score, strict pass, length, topic, the base
model's log-prob per token, the quality guard's verdict).

An engine that dies while a version is scored (unreachable, or HTTP 500
saying its engine core died) is no verdict on the version: it is scored again
once the engine is back. Other 5xx answers are retried twice, then the
version fails.

The verdict (service/gate/verdict.py) compares the candidate with the
promoted version prompt by prompt, and with base: it starts on
`heldout_prompts` prompts and doubles them (scoring the promoted version and
base on the new prompts too) while the interval of the paired score
difference is wider than the tolerance, up to `heldout_prompts_max`. A
refusal names the signal; metrics and the log say which.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import httpx

from core.adapter_store import NotAnnounced, announced_versions, check_announced, read_manifest
from core.bus import Inbox, make_producer
from core.contracts import TOPIC_ADAPTERS, AdapterReady, version_name
from core.topics import topic_name
from core.settings import CommonSettings, GateSettings
from service.gate.metrics import EVAL_SECONDS, PROMOTIONS, REFUSALS, REFUSED_BY, ScoreGauge, sync_promoted
from service.gateway.engine import EngineAdapters, NotServable, engine_died
from service.registry.book import VersionBook
from service.task import make_prompts

log = logging.getLogger(__name__)

COMPONENT = "gate"
SERVER_ERROR_TRIES = 3  # 5xx answers (other than an engine death) while scoring a version before it fails


class PromotionGate:
    def __init__(self, book: VersionBook, adapters: EngineAdapters, settings: GateSettings, bootstrap: str,
                 scores: ScoreGauge, common: CommonSettings | None = None,
                 term: Callable[[], object] | None = None):
        self.book, self.adapters, self.settings, self.bootstrap, self.scores = (
            book, adapters, settings, bootstrap, scores)
        # `term` returns the epoch the gate writes the registry in (falsy while it does not: starting, or fenced
        # by a newer gate): a version is decided only in the term it was picked in, so one whose scoring spanned a
        # reconnect is scored again.
        self._leading = term or (lambda: True)
        self._term: object = None
        self.common = common or CommonSettings()
        self.prompts = make_prompts("heldout", settings.heldout_prompts_max, curriculum=self.common.task_curriculum)
        self._reference = None  # the base model for the fluency signal, loaded on first use
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odpo-gate", daemon=True)
        self._inbox: Inbox[AdapterReady] | None = None
        self._producer = None
        self._next_connect = 0.0
        self._next_store_check = 0.0
        self._engine_down = False  # logged once per outage, not every retry
        self._server_errors: dict[int, int] = {}  # version -> 5xx answers while scoring it (not an engine death)

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
            self._term = self._leading()
            if not self._term:
                self._halt.wait(0.5)
                continue
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
        if time.monotonic() >= self._next_store_check:
            self._read_store()
        if self._inbox is None:
            if time.monotonic() < self._next_connect:
                return
            try:
                self._producer = make_producer(self.bootstrap)
                self._inbox = Inbox(self.bootstrap, topic_name(TOPIC_ADAPTERS), AdapterReady, COMPONENT, self._producer,
                                    group_id=None)
            except Exception as exc:  # noqa: BLE001 - kafka-python raises several kinds; retry later
                log.warning("gate: broker %s unreachable (%s); retrying", self.bootstrap, exc.__class__.__name__)
                self._next_connect = time.monotonic() + 5
                return
        for env in self._inbox.poll(timeout_ms=200):
            if self.book.record(env.value.version) is not None:
                continue  # known (from the store, the registry or an earlier message)
            try:  # only what the store announced (a forged message could name any digest, any version)
                check_announced(self.common.store_dir, env.value, COMPONENT)
            except NotAnnounced as exc:
                if not exc.stale:
                    self._inbox.reject(env, f"not announced in the adapter store: {exc.reason}")
                continue
            if self.book.add(env.value):
                log.info("gate: %s published (parent v%d, %d pairs); waiting to be scored",
                         version_name(env.value.version), env.value.parent_version, env.value.pairs_trained)

    def _read_store(self) -> None:
        """Take every announced version newer than the book's newest (not only the store's newest: if that
        one turns out damaged, the good ones before it are still scored)."""
        self._next_store_check = time.monotonic() + self.settings.store_check_s
        store, newest = self.common.store_dir, self.book.newest()
        try:
            found = [read_manifest(store, v) for v in announced_versions(store) if v > newest]
        except OSError as exc:  # the volume went away: the topic still works; try again later
            log.warning("gate: cannot read the adapter store %s: %s", store, exc)
            return
        for ready in found:
            if ready is None or self.book.record(ready.version) is not None:
                continue
            try:  # the record names its own version's folder (the same check as for the topic's messages)
                check_announced(store, ready, COMPONENT)
            except NotAnnounced as exc:
                log.error("gate: the store's record of %s is not usable: %s", version_name(ready.version), exc.reason)
                continue
            if self.book.add(ready):
                log.info("gate: %s found in the adapter store (odpo.adapters did not bring it); waiting to be "
                         "scored", version_name(ready.version))

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
            verdict, rows = self._judge(version)
            EVAL_SECONDS.observe(time.monotonic() - started)
        except NotServable as exc:
            self._failed(version, f"cannot be served: {exc}", "not_servable")
            return
        except httpx.TransportError as exc:  # the engine is (re)starting: not a verdict on the version
            self._retry(version, f"serving engine unreachable while scoring {name} ({exc})")
            return
        except httpx.HTTPStatusError as exc:
            resp = exc.response
            if resp.status_code >= 500 and engine_died(resp.content):  # it died under us: not a verdict either
                self._retry(version, f"the serving engine died while scoring {name}")
                return
            tries = self._server_errors.pop(version, 0) + 1
            if resp.status_code >= 500 and tries < SERVER_ERROR_TRIES:
                log.warning("gate: HTTP %d while scoring %s (try %d of %d): %s", resp.status_code, name,
                            tries, SERVER_ERROR_TRIES, resp.text[:200])
                self._server_errors[version] = tries
                self.book.requeue(version)
                self._halt.wait(2)
                return
            self._failed(version, f"scoring failed: {exc}", "eval_failed")
            return
        except httpx.HTTPError as exc:
            self._failed(version, f"scoring failed: {exc}", "eval_failed")
            return
        self._server_errors.pop(version, None)
        if self._halt.is_set() or self._leading() != self._term:  # a fenced gate decides nothing: the writing gate scores it
            self.book.requeue(version)
            return
        score = verdict.signals["score"]
        decision = self.book.decide(version, score, verdict if version != self.book.promoted else None,
                                    [r.as_dict() for r in rows], verdict.signals)
        self.scores.set(version, score, verdict.signals)
        if decision.promoted:
            PROMOTIONS.labels("gate").inc()
            log.info("gate: promoted %s (held-out score %.4f; %s had %s)", name, score,
                     version_name(decision.previous), _fmt(self.book.record(decision.previous).score))
        elif version != decision.previous:
            REFUSALS.labels("pinned" if "pinned" in decision.reason else decision.status).inc()
            if decision.status == "refused" and verdict.signal:
                REFUSED_BY.labels(verdict.signal).inc()
            log.warning("gate: %s not promoted (%s): %s", name, decision.status, decision.reason)
        else:
            log.info("gate: %s (promoted) scores %.4f on %d held-out prompts", name, score, len(rows))
        sync_promoted(self.book)

    def _retry(self, version: int, why: str) -> None:
        """Score `version` again once the engine is back (logged once per outage)."""
        if not self._engine_down:
            log.warning("gate: %s; retrying once it is back", why)
        self._engine_down = True
        self.book.requeue(version)
        self._halt.wait(2)

    def _make_servable(self, version: int) -> bool:
        """True once the engine serves `version`; False to try again later (`base` not registered yet)."""
        if version == 0:
            return 0 in self.adapters.listed()
        # every engine serves it before it is scored, so a promotion moves `policy` only where all serve it
        if not self.adapters.wait_listed(version, self.settings.load_wait_s, self._halt):
            rec = self.book.record(version)
            if rec is None:
                raise NotServable("forgotten")
            self.adapters.ensure(rec)
        return True

    def _judge(self, version: int):
        """The verdict on `version` and its evaluation rows, on as many prompts as the verdict needs."""
        from judge.signals import AnswerRow  # judge modules: HTTP and plain Python (torch only for fluency)
        from service.gate.verdict import judge_version

        s = self.settings
        promoted = self.book.promoted
        n = min(s.heldout_prompts, len(self.prompts))
        rows = self._rows(version, n, [AnswerRow(**r) for r in self.book.answers(version) or []])
        while True:
            if version == promoted:
                return judge_version(rows, None, None, s.promotion_tolerance, s.gate_limits()), rows
            ref = self._stored_rows(promoted, n)
            base = self._stored_rows(0, n) if promoted != 0 and version != 0 else None
            verdict = judge_version(rows, ref, base, s.promotion_tolerance, s.gate_limits(), version_name(promoted))
            if verdict.conclusive or n >= len(self.prompts) or self._halt.is_set():
                return verdict, rows
            n = min(2 * n, len(self.prompts))
            log.info("gate: %s vs %s inconclusive (difference %+.3f, interval +-%.3f); scoring %d prompts",
                     version_name(version), version_name(promoted), verdict.difference.mean,
                     verdict.difference.half_width, n)
            rows = self._rows(version, n, rows)

    def _stored_rows(self, version: int, n: int):
        """A decided version's first `n` rows, scoring (and keeping) the prompts it was not scored on yet."""
        from judge.signals import AnswerRow, summarize

        have = [AnswerRow(**r) for r in self.book.answers(version) or []]
        if len(have) >= n:
            return have[:n]
        rows = self._rows(version, n, have)
        self.book.set_evaluation(version, [r.as_dict() for r in rows], summarize(rows))
        return rows

    def _rows(self, version: int, n: int, have: list):
        """`have` extended to the first `n` held-out prompts with `version`'s greedy answers, scored."""
        from judge.evaluate import answer_prompts
        from judge.signals import score_answers

        if len(have) >= n:
            return have[:n]
        s, todo = self.settings, self.prompts[len(have):n]
        for attempt in (1, 2):
            try:
                answers, _ = answer_prompts(self.adapters.scoring_url(), version_name(version), todo, s.eval_max_tokens,
                                            concurrency=s.eval_concurrency, timeout_s=s.request_timeout_s,
                                            headers=self.adapters.headers)
                break
            except httpx.HTTPStatusError as exc:  # the generator unloaded it mid-way: load it and start over
                if exc.response.status_code != 404 or attempt == 2:
                    raise
                self.adapters.ensure(self.book.record(version))
        return have + score_answers(todo, answers, self._reference_scorer())

    def _reference_scorer(self):
        """The base model for the fluency signal; None when off or when it cannot be loaded (said once, loudly:
        the gate then decides without `ref_logprob`)."""
        if not self.settings.reference_logprob or self._reference is False:
            return None
        if self._reference is None:
            from judge.fluency import ReferenceScorer
            from core.assets import base_model_dir

            try:
                self._reference = ReferenceScorer(base_model_dir(self.common.cache_dir, self.common.base_model))
            except Exception as exc:  # noqa: BLE001 - no model here (a pod without it): decide on the rest
                log.error("gate: cannot load the base model for the ref_logprob signal (%s: %s); deciding "
                          "without it (set ODPO_GATE_REFERENCE_LOGPROB=false to say so)",
                          type(exc).__name__, exc)
                self._reference = False
                return None
        return self._reference

    def _failed(self, version: int, reason: str, kind: str) -> None:
        revived = self.book.fail(version, reason)
        if version != self.book.promoted:
            REFUSALS.labels(kind).inc()
        log.warning("gate: %s not promoted: %s", version_name(version), reason)
        if revived:
            log.info("gate: %s, which it superseded, will be scored", ", ".join(map(version_name, revived)))
        sync_promoted(self.book)
        if version == self.book.promoted:
            self._halt.wait(5)  # it is scored again next: do not spin on a failing engine


def _fmt(score: float | None) -> str:
    return "no score" if score is None else f"{score:.4f}"

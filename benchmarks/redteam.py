"""Red team on real parts: `odpo up` runs with client API keys on while an attacker tries every way in that
issue 21 ("Trust boundaries") lists, and a legitimate client and the loop's own traffic go on beside it.

    python -m benchmarks.redteam --rounds 4 --out runs/redteam.json

The attacker has client keys (`client`: inference only; `labeler`: inference and feedback; `feeder`: prompts;
`ratey`: a rate of 0.2/s; `daily`: a daily quota of 3; `hourly`: 2 feedback messages an hour) and the broker on
127.0.0.1, but not the run's message key (`odpo up` makes one and gives it to its children only), the gate's
admin token or vLLM's API key. The attacks (benchmarks/redteam_attacks.py): prompts and feedback without a key,
with the wrong scope, with client-chosen task kinds, twice, on a no-learn response, past the key's limits;
forged, wrongly signed and replayed records on odpo.preferences, .adapters, .control, .served and .prompts;
oversized bodies, too many parts, floods of unknown version names, inexact names, refused versions by name;
the gate's admin API without its token, admin routes on the gateway, vLLM without its key, secrets in other
processes' environments.

Beside them a legitimate client calls `policy` with the `client` key the whole time (every error counted), and
the benchmark's own Kafka readers follow the pairs, versions, dead letters and control records. At the end:
versions consecutive (the trainer's ledger) and promoted as the gate decided (`policy` on the gateway never
names a version the gate did not promote, and never goes back), pairs the judge published that were not
archived (the attacker's excluded), the attacker's pairs absent from the archive and ledger, no pair trained
twice. The table says, attack by attack, whether it was blocked, how, and how many legitimate client requests
failed meanwhile; the exit code is 1 if any attack got through or anything legitimate was lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx

from benchmarks import redteam_attacks as A
from benchmarks import redteam_forgeries as F
from benchmarks.chaos import LOOP_ENV, _bootstrap, _components, _stop, _wait
from benchmarks.chaos_audit import audit
from benchmarks.common import percentile, write_json
from core import signing
from core.broker import free_port
from core.bus import TopicTail, configure_kafka, new_producer
from core.contracts import TOPIC_ADAPTERS, TOPIC_CONTROL, TOPIC_DLQ, TOPIC_PREFERENCES, AdapterReady, DeadLetter
from core.topics import topic_name
from core.settings import CommonSettings
from service.up_view import decided_through
from trainer.export import ExportError, archived_pairs
from trainer.ledger import trained_ledger

# The topics of this deployment (`odpo up` sets no prefix; core/topics.py): every Kafka call uses these.
T_ADAPTERS = topic_name(TOPIC_ADAPTERS)
T_CONTROL = topic_name(TOPIC_CONTROL)
T_DLQ = topic_name(TOPIC_DLQ)
T_PREFERENCES = topic_name(TOPIC_PREFERENCES)

KEYS = {"client": {"scopes": ["inference"]}, "labeler": {"scopes": ["inference", "feedback"]},
        "feeder": {"scopes": ["prompts"]}, "ratey": {"scopes": ["inference"], "rate_per_s": 0.2, "burst": 2},
        "daily": {"scopes": ["inference"], "daily_quota": 3},
        "hourly": {"scopes": ["feedback"], "feedback_per_hour": 2}}


class Watch(threading.Thread):
    """The benchmark's own reader of odpo.preferences, .dlq, .adapters and .control (assigned, no group)."""

    def __init__(self, bootstrap: str):
        super().__init__(name="redteam-watch", daemon=True)
        self.bootstrap, self._halt, self._lock = bootstrap, threading.Event(), threading.Lock()
        self.records: dict[str, list] = {t: [] for t in (T_PREFERENCES, T_DLQ, T_ADAPTERS, T_CONTROL)}
        self.pair_seen: dict[str, float] = {}

    def run(self) -> None:
        tail = None
        while not self._halt.is_set():
            try:
                tail = tail or TopicTail(self.bootstrap, list(self.records), client_id="odpo-redteam-watch")
                got = tail.poll(timeout_ms=500)
            except Exception:  # noqa: BLE001 - the broker stops with odpo up
                tail = None
                self._halt.wait(1)
                continue
            with self._lock:
                for rec in got:
                    self.records[rec.topic].append(rec)
                    if rec.topic == T_PREFERENCES:
                        try:
                            self.pair_seen.setdefault(json.loads(rec.value)["id"], time.time())
                        except (ValueError, KeyError, TypeError):
                            pass

    def _of(self, topic: str, key: bytes | None = None) -> list:
        with self._lock:
            return [r for r in self.records[topic] if key is None or r.key == key]

    def first(self, topic: str, key: bytes | None = None):
        recs = [r for r in self._of(topic, key) if _signed(r)]
        return recs[0] if recs else None

    def last(self, topic: str, key: bytes | None = None):
        recs = [r for r in self._of(topic, key) if _signed(r)]
        return recs[-1] if recs else None

    def dead_letters(self) -> list[DeadLetter]:
        out = []
        for r in self._of(T_DLQ):
            try:
                out.append(DeadLetter.from_bytes(r.value))
            except ValueError:
                pass
        return out

    def versions(self) -> set[int]:
        out = set()
        for r in self._of(T_ADAPTERS):
            try:
                out.add(AdapterReady.from_bytes(r.value).version) if _signed(r) else None
            except ValueError:
                pass
        return out

    def signing_key_id(self) -> str:
        for topic in self.records:
            for r in self._of(topic):
                for k, v in r.headers or []:
                    if k == A.SIG:
                        return v.decode().split(":")[0]
        return "unknown"

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def _signed(rec) -> bool:
    return any(k == A.SIG for k, _ in rec.headers or [])


class LegitClient(threading.Thread):
    """The legitimate client: `policy` with the `client` key, one request after another, each timed."""

    def __init__(self, gateway: str, key: str):
        super().__init__(name="redteam-client", daemon=True)
        self.gateway, self.key, self._halt = gateway, key, threading.Event()
        self.calls: list[tuple[float, float, str]] = []  # (start, seconds, "ok" or the error)

    def run(self) -> None:
        k = 0
        while not self._halt.is_set():
            k += 1
            t0, m0 = time.time(), time.monotonic()
            try:
                r = httpx.post(f"{self.gateway}/v1/chat/completions", timeout=120,
                               headers={"Authorization": f"Bearer {self.key}"},
                               json={"model": "policy", "max_tokens": 12, "messages": [
                                   {"role": "user", "content": f"Say something kind about day {k}."}]})
                outcome = "ok" if r.status_code == 200 and r.json()["choices"] else f"HTTP {r.status_code}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                outcome = type(exc).__name__
            self.calls.append((t0, time.monotonic() - m0, outcome))
            self._halt.wait(0.3)

    def p50(self, start: float, end: float) -> float | None:
        xs = [s for t, s, o in list(self.calls) if start <= t < end and o == "ok"]
        return percentile(xs, 50) if xs else None

    def errors(self, start: float = 0.0, end: float = float("inf")) -> Counter:
        return Counter(o for t, _, o in list(self.calls) if start <= t < end and o != "ok")

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=130)


class Monitor(threading.Thread):
    """Every second: what the gate promoted (and whether it writes) and what the gateway routes `policy` to;
    `stopping_at` is when the gate's registry first showed the last round decided (odpo up then stops)."""

    def __init__(self, gateway: str, gate: str, store: Path, rounds: int):
        super().__init__(name="redteam-monitor", daemon=True)
        self.gateway, self.gate, self.store, self.rounds = gateway, gate, store, rounds
        self.samples: list[tuple[float, int | None, int | None]] = []  # (time, gate promoted, gateway policy)
        self.stopping_at: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            if self.stopping_at is None and decided_through(registry(self.store), self.rounds):
                self.stopping_at = time.time()
            gate, gw = A.readyz(self.gate), A.readyz(self.gateway)
            self.samples.append((time.time(), gate and gate.get("promoted"), gw and gw.get("policy_version")))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def registry(store: Path) -> dict | None:
    """The gate's registry file as the admin view's shape (`versions`, `promoted`, `history`)."""
    try:
        state = json.loads((store / "gate-registry.json").read_text())
    except (OSError, ValueError):
        return None
    return {**state, "versions": state.get("records", [])}


def run(args) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="odpo-redteam-"))
    keys = {kid: f"rt-{kid}-{secrets.token_urlsafe(24)}" for kid in KEYS}
    keys_file = run_dir / "api-keys.json"
    keys_file.write_text(json.dumps([{"id": kid, "sha256": hashlib.sha256(keys[kid].encode()).hexdigest(), **spec}
                                     for kid, spec in KEYS.items()]))
    keys_file.chmod(0o600)
    ports = set()
    while len(ports) < 4:
        ports.add(free_port())
    port, gate_port, trainer_port, generator_port = sorted(ports)
    gateway, gate, store = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gate_port}", run_dir / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("ODPO_MESSAGE_KEY", "ODPO_MESSAGE_KEY_FILE")}
    env.update({**LOOP_ENV, "ODPO_GATEWAY_API_KEYS_FILE": str(keys_file), "ODPO_TRAINER_METRICS_PORT": str(trainer_port),
                "ODPO_GENERATOR_METRICS_PORT": str(generator_port)})
    cmd = [sys.executable, "-m", "service.cli", "up", "--rounds", str(args.rounds), "--run-dir", str(run_dir),
           "--port", str(port), "--gate-port", str(gate_port), "--window-pairs", "8", "--heldout-prompts", "4",
           "--heldout-prompts-max", "4"]
    deadline = time.time() + args.timeout_s
    print(f"run folder {run_dir}; odpo up --rounds {args.rounds}", flush=True)
    with open(run_dir / "up.out", "ab") as up_log:
        up = subprocess.Popen(cmd, env=env, stdout=up_log, stderr=subprocess.STDOUT, start_new_session=True)
    watch = client = monitor = None
    rows: list[A.Row] = []
    ctx = None
    timed_out = False
    try:
        left = lambda: max(1.0, deadline - time.time())  # noqa: E731
        _wait(lambda: A.readyz(gateway) is not None and A.readyz(gate) is not None, left(), up,
              "the gateway and the gate to be ready")
        bootstrap = _bootstrap(run_dir / "up.out")
        signing.configure(None)  # the attacker signs nothing (it has no key)
        configure_kafka(CommonSettings().model_copy(update={"kafka_security_protocol": "PLAINTEXT"}))
        watch = Watch(bootstrap)
        watch.start()
        client = LegitClient(gateway, keys["client"])
        client.start()
        monitor = Monitor(gateway, gate, store, args.rounds)
        monitor.start()
        ctx = A.Ctx(gateway, gate, keys, store, run_dir, watch, new_producer(bootstrap, acks="all"),
                    {"gateway": f"{gateway}/metrics", "gate": f"{gate}/metrics",
                     "trainer": f"http://127.0.0.1:{trainer_port}/metrics",
                     "generator": f"http://127.0.0.1:{generator_port}/metrics"})
        _wait(lambda: watch.first(T_PREFERENCES) is not None, left(), up, "the first preference pair")
        time.sleep(20)  # the legitimate client's latency before any attack
        step = lambda fn, *a: _step(rows, client, fn, ctx, *a)  # noqa: E731
        step(A.attack_prompts), step(A.attack_judge_regex), step(A.attack_feedback), step(A.attack_key_limits)
        step(A.attack_sizes), step(A.attack_admin), step(F.attack_forged_prompt), step(F.attack_served)
        step(F.attack_forged_pairs), step(F.attack_replayed_pair)
        _wait(lambda: (A.readyz(gateway) or {}).get("policy_version", 0) >= 1, left(), up,
              "version 1 to be promoted and routed")
        pids = {name: int(e["pid"]) for name, e in _components(run_dir).items() if "pid" in e}
        step(A.attack_names), step(A.attack_unknown_flood, client), step(F.attack_adapters)
        step(F.attack_control), step(A.attack_vllm, pids.get("generator")), step(A.attack_secrets, pids)
        while up.poll() is None and time.time() < deadline:
            A.check_refused_by_name(ctx)
            time.sleep(3)
        timed_out = up.poll() is None
    except (TimeoutError, RuntimeError) as exc:
        print(f"stopped early: {exc}", flush=True)
        timed_out = True
    finally:
        for part in (client, monitor):
            if part is not None:
                part.stop()
        _stop(up)
        if watch is not None:
            watch.stop()
    if ctx is not None:
        rows.append(A.refused_row(ctx))
    report = _audit(ctx, rows, watch, client, monitor, store, timed_out, up.returncode)
    if args.keep:
        report["run_dir"] = str(run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def _step(rows: list, client: LegitClient, fn, ctx, *extra) -> None:
    started = time.time()
    try:
        got = fn(ctx, *extra)
    except Exception as exc:  # noqa: BLE001 - one attack's failure to run is a row, not the end of the run
        got = A.Row(fn.__name__, "-", False, f"the attack itself failed: {type(exc).__name__}: {exc}"[:300])
    for row in got if isinstance(got, list) else [got]:
        row.started, row.ended = started, time.time()
        row.legit_lost = sum(client.errors(started, row.ended).values())
        rows.append(row)
        print(f"  {_verdict(row):<11} {row.attack}", flush=True)


def _audit(ctx, rows, watch, client, monitor, store: Path, timed_out: bool, up_rc) -> dict:
    stopping_at = (monitor.stopping_at if monitor else None) or time.time()
    forged = (ctx.forged_pairs if ctx else set())
    published = {pid: t for pid, t in (watch.pair_seen if watch else {}).items() if pid not in forged}
    loop = audit(store, published, [], [], stopping_at)
    try:
        archived = {p.id for p in archived_pairs(store)}
    except ExportError:
        archived = set()
    trained = {pid for ids in trained_ledger(store).values() for pid in ids}
    leaked = sorted(forged & (archived | trained))
    for row in rows:
        if row.attack.startswith("forged PreferencePair") and row.blocked is not None:
            row.blocked = row.blocked and not leaked
            row.how += f"; in archive or ledger: {leaked or 'none'}"
        if row.attack.startswith("replayed signed PreferencePair") and ctx and ctx.replayed_pairs:
            row.blocked = loop["pairs_trained_twice"] == 0
            row.how += f"; pairs trained twice: {loop['pairs_trained_twice']}"
    reg = registry(store) or {}
    promoted_set = {0, reg.get("promoted", 0)} | {h for h in reg.get("history", []) if isinstance(h, int)}
    samples = [s for s in (monitor.samples if monitor else []) if s[0] < stopping_at - 5]
    routed = [s[2] for s in samples if s[2] is not None]
    gated = [s[1] for s in samples if s[1] is not None]
    strange = sorted({v for v in routed if v not in promoted_set and v not in gated})
    backwards = [(a, b) for seq in (routed, gated) for a, b in zip(seq, seq[1:]) if b < a]
    gate_down = streak = 0
    for s in samples:  # the longest run of seconds the gate was not ready (writing)
        streak = streak + 1 if s[1] is None else 0
        gate_down = max(gate_down, streak)
    newest = ctx.adapter_attack_newest if ctx else None
    later = [r["version"] for r in reg.get("versions", []) if newest is not None and r["version"] > newest]
    later_promoted = any(v in promoted_set for v in later) if later else None
    for row in rows:
        if row.attack.startswith("forged AdapterReady") and row.blocked is not None:
            row.blocked = row.blocked and later_promoted is not False
            row.how += (f"; later versions {later} promoted: {sorted(set(later) & promoted_set)}" if later else
                        "; no later version in this run (raise --rounds) to show real versions still promoted")
    errors = client.errors(0, stopping_at) if client else Counter()
    legit_failed = {k: v for k, v in (ctx.legit if ctx else {}).items() if k.endswith("/failed")}
    counts = {
        "versions": loop["versions"], "versions_consecutive": loop["versions_consecutive"],
        "gate_decisions": {r["version"]: r["status"] for r in reg.get("versions", [])},
        "bogus_versions_in_registry": [v for v in (A.BIG, 999) if any(r["version"] == v for r in reg.get("versions", []))],
        "policy_routed_to_unpromoted": strange, "policy_went_back": backwards[:5], "gate_not_ready_samples": gate_down,
        "versions_after_forged_adapter": later, "later_version_promoted": later_promoted,
        "pairs_published": loop["pairs_published"], "pairs_archived": loop["pairs_archived"],
        "pairs_trained": loop["pairs_trained"], "pairs_trained_twice": loop["pairs_trained_twice"],
        "pairs_lost": loop["pairs_lost_otherwise"], "pairs_published_while_stopping": loop["pairs_lost_at_stop"],
        "client_requests_ok": sum(1 for c in (client.calls if client else []) if c[2] == "ok"),
        "client_errors": dict(errors), "client_errors_while_stopping": dict(client.errors(stopping_at) if client else {}),
        "legit_calls": dict(ctx.legit if ctx else {}), "legit_failed": legit_failed,
        "timed_out": timed_out, "up_exit_code": up_rc,
    }
    through = [r.attack for r in rows if r.blocked is False]
    lost = (counts["pairs_lost"] or sum(errors.values()) or legit_failed or not loop["versions_consecutive"]
            or strange or backwards or gate_down >= 5 or counts["bogus_versions_in_registry"] or later_promoted is False)
    return {"rows": [asdict(r) for r in rows], "counts": counts, "attacks_through": through,
            "legit_lost": bool(lost), "ok": not through and not lost and not timed_out}


def _verdict(row) -> str:
    blocked = row["blocked"] if isinstance(row, dict) else row.blocked
    return {True: "blocked", False: "GOT THROUGH", None: "not run"}[blocked]


def print_report(r: dict) -> None:
    print(f"\n{'result':<11} {'legit lost':<10} attack")
    for row in r["rows"]:
        print(f"{_verdict(row):<11} {row['legit_lost']:<10} {row['attack']}")
        print(f"{'':<22} expected: {row['expected']}")
        print(f"{'':<22} observed: {row['how']}")
    c = r["counts"]
    print(f"\nversions: {c['versions']} ({'consecutive' if c['versions_consecutive'] else 'NOT consecutive'}); "
          f"gate: {c['gate_decisions']}; policy routed to a version the gate did not promote: "
          f"{c['policy_routed_to_unpromoted'] or 'never'}; went back: {c['policy_went_back'] or 'never'}; gate not "
          f"ready for at most {c['gate_not_ready_samples']} s in a row; versions after the forged AdapterReady "
          f"{c['versions_after_forged_adapter']} promoted: {c['later_version_promoted']}")
    print(f"pairs: published {c['pairs_published']} (the attacker's excluded), archived {c['pairs_archived']}, "
          f"trained {c['pairs_trained']}, trained twice {c['pairs_trained_twice']}, lost {c['pairs_lost']} "
          f"(published while odpo up stopped: {c['pairs_published_while_stopping']})")
    print(f"legitimate client: {c['client_requests_ok']} ok, errors {c['client_errors'] or 'none'} (while odpo up "
          f"stopped: {c['client_errors_while_stopping'] or 'none'}); other legitimate calls {c['legit_calls']}")
    print(f"attacks through: {r['attacks_through'] or 'none'}; legitimate lost: {'YES' if r['legit_lost'] else 'no'}"
          + ("; TIMED OUT before the last round" if c["timed_out"] else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.redteam", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON file of the table and the counts.")
    p.add_argument("--rounds", type=int, default=4, help="Versions the gate decides before odpo up stops (>= 2: "
                   "one before the forged AdapterReady, one after).")
    p.add_argument("--timeout-s", type=float, default=1800, help="The whole run at most this long.")
    p.add_argument("--keep", action="store_true", help="Keep the run folder (its path is printed and in the JSON).")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    report = run(args)
    print_report(report)
    write_json(args.out, report)
    if args.keep:
        print(f"run folder kept: {report.get('run_dir')}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

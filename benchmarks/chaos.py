"""Chaos on real parts: `odpo up` runs the whole loop while clients call the gateway and a component is
killed with SIGKILL every `--interval-s` seconds, for `--kills` kills.

    python -m benchmarks.chaos --kills 12 --interval-s 60 --out runs/chaos

Targets (`--targets`): trainer, generator, vllm-engine (vLLM's engine core process, a grandchild of the
generator), judge (the verifier judge, `judge` in components.json), gateway, gate (`odpo gate`, the
promotion gate and the one writer of the registry on odpo.control), broker (the embedded Tansu broker
`odpo up` supervises); the components are `odpo up`'s (service/up.py COMPONENTS), their pids read from
components.json. Clients use the official `openai` client on the gateway (`policy`, streaming and not). A
kill is recovered once the component runs again under a new pid (for vllm-engine: the generator), a new
preference pair has been published since the kill, and both the gateway and the gate answer /readyz (the
gate: it writes the registry again); a new generator must also have published a candidate set, a new
trainer must have archived a pair, and after a gate kill every gateway must route `policy` to the version
the gate has promoted (a decision read from odpo.control). After the last kill the loop runs
`--cooldown-s`, the clients stop, the trainer's archive is given time to catch up, and `odpo up` stops.

Reported (chaos.json in `--out`, and a table): versions produced and whether they are consecutive; pairs
the judge published, archived, trained, trained twice (the trainer's ledger), lost with a killed broker
(published, never archived, seen before a broker kill) and lost otherwise; client requests and errors
by kind; recovery p50 and max; pairs/s before the first kill and after the last recovery.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from benchmarks.chaos_audit import ClientLog, Kill, PairTail, audit
from benchmarks.common import OPEN_GATE_ENV
from core.broker import free_port
from trainer.archive import archive_files

TARGETS = ("trainer", "generator", "vllm-engine", "judge", "gateway", "gate", "broker")
# Faster loop settings for a machine with 2 cores: a small window, a short answer, a gate (ODPO_GATE_*) on few
# prompts that promotes any version (this run checks survival, not learning; benchmarks/efficacy.py checks
# learning). The held-out prompt count goes to `odpo up` as arguments, which set the gate's.
LOOP_ENV = {"ODPO_GENERATOR_MAX_TOKENS": "24", **OPEN_GATE_ENV, "HF_HUB_OFFLINE": "1"}


@dataclass
class ChaosOptions:
    out: Path
    kills: int = 6
    interval_s: float = 60.0
    targets: tuple[str, ...] = TARGETS
    in_turn: bool = False  # each target in order (the test) instead of at random
    clients: int = 2
    warmup_s: float = 60.0
    cooldown_s: float = 60.0
    drain_s: float = 120.0  # at most this long for the trainer to archive the last pairs before odpo up stops
    window_pairs: int = 8
    recover_timeout_s: float = 600.0
    ready_timeout_s: float = 900.0
    seed: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)


def run(opts: ChaosOptions) -> dict:
    opts.out.mkdir(parents=True, exist_ok=True)
    port, gate_port = free_port(), free_port()
    while gate_port == port:
        gate_port = free_port()
    gateway, gate = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gate_port}"
    cmd = [sys.executable, "-m", "service.cli", "up", "--run-dir", str(opts.out), "--port", str(port),
           "--gate-port", str(gate_port), "--window-pairs", str(opts.window_pairs), "--heldout-prompts", "4",
           "--heldout-prompts-max", "4"]
    env = {**os.environ, **LOOP_ENV, **opts.extra_env}
    with open(opts.out / "up.out", "ab") as up_log:
        up = subprocess.Popen(cmd, env=env, stdout=up_log, stderr=subprocess.STDOUT, start_new_session=True)
    tail = clients = None
    kills: list[Kill] = []
    broker_kills: list[float] = []
    before = after = 0.0
    log = ClientLog()
    try:
        _wait(lambda: _ready(gateway) and _ready(gate), opts.ready_timeout_s, up,
              "the gateway and the gate to be ready")
        bootstrap = _bootstrap(opts.out / "up.out")
        tail = PairTail(bootstrap)
        tail.start()
        clients = _Clients(gateway, opts.clients, log).start()
        _wait(lambda: tail.count() > 0, opts.ready_timeout_s, up, "the first preference pair")
        started = time.time()
        time.sleep(opts.warmup_s)
        before = tail.seen_between(started, time.time()) / max(1e-9, time.time() - started)
        _chaos(opts, up, gateway, gate, tail, kills, broker_kills)
        recovered = max((k.recovered_at or k.at for k in kills), default=time.time())
        time.sleep(opts.cooldown_s)
        after = tail.seen_between(recovered, time.time()) / max(1e-9, time.time() - recovered)
        clients.stop()
        _drain(opts.out / "store", tail, up, opts.drain_s)
    finally:
        if clients is not None:
            clients.stop()
        stopping_at = time.time()
        _stop(up)
        if tail is not None:
            tail.stop()
    report = audit(opts.out / "store", tail.snapshot() if tail else {}, kills, broker_kills, stopping_at)
    report.update({"pairs_per_s_before": round(before, 3), "pairs_per_s_after": round(after, 3),
                   "client_requests_ok": log.ok, "client_errors": dict(log.errors),
                   "restarts": _components(opts.out), "options": {**asdict(opts), "out": str(opts.out)}})
    (opts.out / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _chaos(opts: ChaosOptions, up, gateway: str, gate: str, tail: PairTail, kills: list[Kill],
           broker_kills: list[float]):
    rng, bag = random.Random(opts.seed), []
    for i in range(opts.kills):
        if opts.in_turn:
            target = opts.targets[i % len(opts.targets)]
        else:  # random order, but every target once per round: each is killed equally often
            bag = bag or rng.sample(opts.targets, len(opts.targets))
            target = bag.pop()
        pid = _pid_of(opts.out, target)
        at = time.time()
        os.kill(pid, signal.SIGKILL)
        if target == "broker":
            broker_kills.append(at)
            tail.rewind()
        kill = Kill(target, at, pid)
        kills.append(kill)
        print(f"kill {i + 1}/{opts.kills}: {target} (pid {pid})", flush=True)
        owner = "generator" if target == "vllm-engine" else target
        owner_pid = pid if owner == target else _pid_of(opts.out, owner)

        def recovered(owner=owner, owner_pid=owner_pid, at=at) -> bool:
            entry = _components(opts.out).get(owner, {})
            if _pid_of(opts.out, owner, missing_ok=True) in (None, owner_pid):
                return False  # not running again yet
            since = max(at, float(entry.get("started_at", at)))
            if owner == "generator" and tail.last_candidates <= since:
                return False  # the new generator has not sampled yet
            if owner == "trainer" and _archive_mtime(opts.out / "store") <= since:
                return False  # the new trainer has not taken a pair yet
            if owner == "gate" and not _routes_promoted(gateway, gate):
                return False  # the gateway does not route `policy` as the new gate decided (yet)
            return tail.first_after(at) is not None and _ready(gateway) and _ready(gate)

        try:
            _wait(recovered, opts.recover_timeout_s, up, f"recovery from killing {target}")
            kill.recovered_at = time.time()
            if target == "broker":
                tail.rewind()
            print(f"  recovered in {kill.recovery_s:.1f}s", flush=True)
        except TimeoutError as exc:
            print(f"  NOT recovered: {exc}", flush=True)
            break
        time.sleep(max(0.0, opts.interval_s - (time.time() - at)))


def _pid_of(run_dir: Path, target: str, missing_ok: bool = False) -> int | None:
    """The pid to kill for `target` (vllm-engine: the engine core under the generator's vLLM)."""
    if target == "vllm-engine":
        gen = _pid_of(run_dir, "generator")
        engines = [p for p in psutil.Process(gen).children(recursive=True) if "EngineCore" in p.name()]
        if not engines:
            raise RuntimeError("no vLLM engine core process under the generator")
        return engines[0].pid
    entry = _components(run_dir).get(target)
    if entry is None or not psutil.pid_exists(int(entry["pid"])):
        if missing_ok:
            return None
        raise RuntimeError(f"{target} is not running (components.json: {entry})")
    return int(entry["pid"])


def _archive_mtime(store: Path) -> float:
    return max((f.stat().st_mtime for f in archive_files(store)), default=0.0)


def _components(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / "components.json").read_text())
    except (OSError, ValueError):
        return {}
    return data.get("components", data)


class _Clients:
    """Concurrent clients on the gateway: the official openai client, `policy`, streaming every other call."""

    def __init__(self, gateway: str, n: int, log: ClientLog):
        import openai

        self.log, self._halt = log, threading.Event()
        self._client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> _Clients:
        for t in self._threads:
            t.start()
        return self

    def _loop(self, i: int) -> None:
        import openai

        k = 0
        while not self._halt.is_set():
            k += 1
            try:
                messages = [{"role": "user", "content": f"Say something kind about day {k} of client {i}."}]
                if k % 2:
                    stream = self._client.chat.completions.create(model="policy", messages=messages, max_tokens=16,
                                                                  stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                else:
                    resp = self._client.chat.completions.create(model="policy", messages=messages, max_tokens=16)
                    text = resp.choices[0].message.content or ""
                self.log.success() if text is not None else None
            except openai.APIStatusError as exc:
                self.log.error(f"HTTP {exc.status_code}")
            except openai.APIError as exc:
                self.log.error(type(exc).__name__)
            self._halt.wait(0.5)

    def stop(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(timeout=130)


def _drain(store: Path, tail: PairTail, up, timeout_s: float = 120.0) -> None:
    """Give the trainer time to archive the pairs published last (stops when nothing changed for 30 s); a
    stopping trainer also archives what is still on the topic, this only keeps that short."""
    from trainer.export import ExportError, archived_pairs

    deadline, last, still_since = time.time() + timeout_s, -1, time.time()
    while time.time() < deadline and up.poll() is None:
        try:
            archived = {p.id for p in archived_pairs(store)}
        except ExportError:
            archived = set()
        missing = len(set(tail.snapshot()) - archived)
        if missing == 0:
            return
        if missing != last:
            last, still_since = missing, time.time()
        elif time.time() - still_since > 30:
            return
        time.sleep(2)


def _ready(gateway: str) -> bool:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _routes_promoted(gateway: str, gate: str) -> bool:
    """The gateway's `policy` is the version the gate has promoted (both /readyz; the gate's decision reaches
    the gateway through odpo.control)."""
    try:
        decided = httpx.get(f"{gate}/readyz", timeout=5)
        routed = httpx.get(f"{gateway}/readyz", timeout=5)
        return decided.status_code == routed.status_code == 200 and \
            decided.json().get("promoted") == routed.json().get("policy_version")
    except (httpx.HTTPError, ValueError):
        return False


def _bootstrap(up_out: Path) -> str:
    for line in up_out.read_text(errors="replace").splitlines():
        if line.startswith("broker: Tansu on "):
            return line.split()[-1]
    raise RuntimeError(f"no broker address in {up_out}")


def _wait(cond, timeout_s: float, up, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"odpo up exited with code {up.returncode} while waiting for {what}")
        try:
            if cond():
                return
        except (RuntimeError, psutil.Error):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} took longer than {timeout_s:.0f}s")


def _stop(up) -> None:
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs") / time.strftime("chaos-%Y%m%d-%H%M%S"))
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--interval-s", type=float, default=60.0)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"Comma-separated, of {', '.join(TARGETS)}.")
    p.add_argument("--in-turn", action="store_true",
                   help="Kill the targets in order instead of in a random order (each once per round either way).")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=120.0)
    p.add_argument("--cooldown-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        p.error(f"unknown targets: {', '.join(sorted(unknown)) or '(none given)'}")
    report = run(ChaosOptions(out=args.out, kills=args.kills, interval_s=args.interval_s, targets=targets,
                              in_turn=args.in_turn, clients=args.clients, warmup_s=args.warmup_s,
                              cooldown_s=args.cooldown_s, seed=args.seed))
    print_report(report)
    return 0


def print_report(r: dict) -> None:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(r["client_errors"].items())) or "none"
    print(f"kills survived: {r['kills_recovered']}/{len(r['kills'])} "
          f"(recovery p50 {_s(r['recovery_p50_s'])}, max {_s(r['recovery_max_s'])})")
    for k in r["kills"]:
        print(f"  {k['component']:<12} recovered in {_s(k['recovery_s'])}")
    print(f"versions: {len(r['versions'])} ({'consecutive' if r['versions_consecutive'] else 'NOT consecutive'}: "
          f"{r['versions']})")
    print(f"pairs: published {r['pairs_published']}, archived {r['pairs_archived']}, trained {r['pairs_trained']}, "
          f"trained twice {r['pairs_trained_twice']}, lost with a killed broker {r['pairs_lost_with_broker']}, "
          f"published while odpo up stopped {r['pairs_lost_at_stop']}, lost otherwise {r['pairs_lost_otherwise']}")
    print(f"clients: {r['client_requests_ok']} ok, errors: {errors}")
    print(f"pairs/s: {r['pairs_per_s_before']} before the first kill, {r['pairs_per_s_after']} after the last "
          f"recovery (ratio {r['pairs_per_s_after'] / max(1e-9, r['pairs_per_s_before']):.2f})")


def _s(x) -> str:
    return "-" if x is None else f"{x:.1f}s"


if __name__ == "__main__":
    raise SystemExit(main())

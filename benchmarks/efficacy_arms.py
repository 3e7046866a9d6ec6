"""The arms of benchmarks/efficacy.py: the online run (`odpo up`, or a folder of one), the offline arm (pairs
sampled once from base, judged as online, `odpo train`), and the vLLM engine and evaluator both are scored with."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import httpx

from benchmarks.efficacy_report import _f

CURVE_SIGNALS = ("score", "score_ci", "strict_pass", "mean_words", "empty_share", "distinct2", "on_topic_share",
                 "ref_logprob", "guard_pass")
# The gate's registry in the store (service/gate/app.py REGISTRY_FILE), and its name in run folders of an odpo
# before the gate was its own component (the gateway kept it); the first one present is read.
REGISTRY_FILES = ("gate-registry.json", "gateway-registry.json")
STARTED = time.monotonic()


class BenchFailed(Exception):
    """A step failed; the message says which and shows the tail of its log."""


def say(msg: str) -> None:
    s = int(time.monotonic() - STARTED)
    print(f"[{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}] {msg}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return "(no log)"


def odpo_bin() -> str:
    exe = Path(sys.executable).parent / "odpo"
    return str(exe) if exe.exists() else "odpo"


# -- online: `odpo up`, or a folder of one ---------------------------------------------------------------------
def run_online(seed: int, run_dir: Path, args, log_file: Path) -> None:
    """`odpo up --rounds R` for one seed; its lines are echoed with a prefix and kept in `log_file`."""
    from core.broker import free_port

    rounds = args.pairs // args.window
    cmd = [odpo_bin(), "up", "--rounds", str(rounds), "--window-pairs", str(args.window), "--run-dir", str(run_dir),
           "--port", str(free_port()), "--heldout-prompts", str(max(48, args.curve_prompts)),
           "--train-prompts", str(args.train_prompts)]
    env = {**os.environ, "ODPO_TRAINER_SEED": str(seed), "ODPO_GENERATOR_SEED": str(seed), "HF_HUB_OFFLINE": "1"}
    say(f"online s{seed}: {' '.join(cmd)} (ODPO_TRAINER_SEED={seed} ODPO_GENERATOR_SEED={seed}); log {log_file}")
    deadline = time.monotonic() + args.online_timeout_min * 60
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.strip():
                    say(f"  [online s{seed}] {line.rstrip()}")
                if time.monotonic() > deadline:
                    raise BenchFailed(f"online s{seed}: `odpo up` still running after {args.online_timeout_min} min")
            rc = proc.wait()
        finally:
            _stop(proc)
    if rc != 0:
        raise BenchFailed(f"online s{seed}: `odpo up` exited with {rc}; last lines of {log_file}:\n{tail(log_file)}"
                          f"\n(component logs: {run_dir / 'logs'})")


def _stop(proc: subprocess.Popen, grace_s: float = 90) -> None:
    """SIGTERM (odpo up then stops its components and broker), SIGKILL if it does not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def read_online(seed: int, run_dir: Path, budget: int, window: int, curve_n: int) -> dict:
    """The online arm of one seed from its run folder: final and promoted versions and the gate's curve."""
    from judge.signals import AnswerRow, summarize

    summary_file = run_dir / "summary.json"
    registry_file = next((f for f in (run_dir / "store" / name for name in REGISTRY_FILES) if f.is_file()), None)
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    registry = json.loads(registry_file.read_text()) if registry_file is not None else None
    if summary is None and registry is None:
        raise BenchFailed(f"{run_dir}: neither summary.json nor store/{' or store/'.join(REGISTRY_FILES)}: "
                          "not an `odpo up` run")
    records = {r["version"]: r for r in (registry or {}).get("records", [])}
    srows = {r["version"]: r for r in (summary or {}).get("versions", [])}
    store = run_dir / "store"
    in_store = sorted(int(m.group(1)) for p in store.iterdir() if p.is_dir()
                      and (m := re.fullmatch(r"policy-v([1-9][0-9]*)", p.name))) if store.is_dir() else []

    def published(v: int) -> float | None:
        """AdapterReady.created_at as the gate recorded it, else when the trainer wrote the version's folder."""
        at = records.get(v, {}).get("published_at")
        folder = store / f"policy-v{v}"
        return at if at or not folder.is_dir() else folder.stat().st_mtime

    def pairs_of(v: int) -> int:
        p = records.get(v, {}).get("pairs_trained")
        p = srows.get(v, {}).get("pairs_trained") if p is None else p
        return v * window if p is None else int(p)

    within = [v for v in in_store if pairs_of(v) <= budget]
    if not within:
        raise BenchFailed(f"{store}: no policy-v<N> trained on at most {budget} pairs (has: {in_store or 'none'})")
    final = max(within)
    promoted = (summary or {}).get("heldout", {}).get("promoted_version")
    promoted = (registry or {}).get("promoted") if promoted is None else promoted
    t0 = _online_start(run_dir, summary, records)
    keys = {f.name for f in fields(AnswerRow)}
    curve = []
    for v in sorted(set(records) | set(srows) | set(in_store)):
        rec, srow = records.get(v, {}), srows.get(v, {})
        sig, n, source = None, 0, None
        if rec.get("rows"):
            rows = [AnswerRow(**{k: r[k] for k in keys}) for r in rec["rows"][:curve_n]]
            sig, n, source = curve_signals(summarize(rows)), len(rows), "gate"
        elif srow.get("score") is not None:  # no registry: the summary's numbers (on the gate's prompt count)
            sig, n, source = curve_signals({**srow, "score": srow["score"]}), srow.get("prompts_scored"), "summary"
        # else superseded or failed: the gate never scored it (fill_online_curve may)
        wall = 0.0 if v == 0 else (published(v) - t0 if published(v) and t0 else None)
        curve.append({"version": v, "pairs": pairs_of(v) if v else 0, "wall_s": wall, "n": n, "source": source,
                      "status": rec.get("status") or srow.get("status"), "signals": sig})
    final_pub = published(final)
    return {"run_dir": str(run_dir), "store": str(store), "versions_in_store": in_store, "final_version": final,
            "final_pairs": pairs_of(final), "promoted_version": promoted,
            "final_wall_s": final_pub - t0 if final_pub and t0 else None,
            "elapsed_s": (summary or {}).get("elapsed_s"), "curve": curve,
            "note": (f"the store also has {[v for v in in_store if v > final]} (trained past the budget): not used"
                     if in_store and in_store[-1] > final else "")}


def fill_online_curve(evaluator: Evaluator, engine: Engine, seed: int, arm: dict, every: int, n: int) -> None:
    """Score here the online versions (up to the final one) the gate skipped (superseded by a newer one while
    it was busy) or scored on fewer prompts: every `every`-th version and the final one."""
    for p in arm["curve"]:
        v = p["version"]
        if not v or v > arm["final_version"] or (p["signals"] is not None and (p["n"] or 0) >= n):
            continue
        if (v % every and v != arm["final_version"]) or v not in arm["versions_in_store"]:
            continue
        name = f"online-s{seed}-v{v}"
        engine.load(name, Path(arm["store"]) / f"policy-v{v}")
        try:
            p["signals"] = curve_signals(evaluator.result(name, name, n).signals)
        finally:
            if v != arm["final_version"]:  # the final version is evaluated again, on more prompts
                engine.unload(name)
        p["n"], p["source"] = n, "benchmark"
        say(f"  curve {name} (not scored by the gate): score {p['signals']['score']:.3f}, "
            f"{p['signals']['mean_words']:.1f} words ({n} prompts)")


def _online_start(run_dir: Path, summary: dict | None, records: dict) -> float | None:
    """When the run began: `odpo up` writes admin-token right after starting its broker."""
    token = run_dir / "admin-token"
    if token.is_file():
        return token.stat().st_mtime
    evaluated = [r["evaluated_at"] for r in records.values() if r.get("evaluated_at")]
    if evaluated and summary and summary.get("elapsed_s"):
        return max(evaluated) - summary["elapsed_s"]
    return None


def curve_signals(sig: dict) -> dict:
    return {k: sig.get(k) for k in CURVE_SIGNALS}


# -- one vLLM for sampling and evaluation ---------------------------------------------------------------------
class Engine:
    """The vLLM server of this benchmark: `base` as the zero adapter, adapters loaded and unloaded by name."""

    def __init__(self, model: Path, out: Path):
        from generator.server import VllmServer
        from core.settings import GeneratorSettings

        self.model = model
        self.server = VllmServer(model, GeneratorSettings(vllm_port=0, startup_timeout_s=900),
                                 log_file=out / "vllm.log")
        self.client: httpx.Client | None = None
        self.adapters = None

    def start(self, out: Path) -> "Engine":
        from generator.adapters import AdapterManager
        from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter

        say(f"starting vLLM (log {self.server.log_file})")
        self.server.start()
        say(f"vLLM ready on {self.server.url} after {self.server.startup_s:.0f}s")
        self.client = httpx.Client(base_url=self.server.url, timeout=600)
        self.adapters = AdapterManager(self.client, out / "engine-store", self.model)
        self.adapters.register_base(write_zero_adapter(self.model, out / "engine-store" / ZERO_ADAPTER_DIR))
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def load(self, name: str, folder: Path) -> None:
        resp = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder.resolve())})
        if resp.status_code != 200 and "already been loaded" not in resp.text:
            raise BenchFailed(f"vLLM refused adapter {name} from {folder}: HTTP {resp.status_code} {resp.text[:300]}")

    def unload(self, name: str) -> None:
        try:
            self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError:
            pass

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.stop()


class Evaluator:
    """Greedy answers to the held-out prompts per served model name, scored once and kept (prefixes reused)."""

    def __init__(self, engine: Engine, prompts: list, max_tokens: int, reference):
        self.engine, self.prompts, self.max_tokens, self.reference = engine, prompts, max_tokens, reference
        self._rows: dict[str, list] = {}
        self._seconds: dict[str, float] = {}

    def rows(self, model: str, n: int) -> list:
        from judge.evaluate import answer_prompts
        from judge.signals import score_answers

        have = self._rows.get(model, [])
        if len(have) < n:
            todo = self.prompts[len(have):n]
            t0 = time.monotonic()
            answers, _ = answer_prompts(self.engine.url, model, todo, self.max_tokens, concurrency=8)
            have = have + score_answers(todo, answers, self.reference)
            self._rows[model] = have
            self._seconds[model] = self._seconds.get(model, 0.0) + time.monotonic() - t0
        return have[:n]

    def result(self, model: str, label: str, n: int):
        from judge.evaluate import ModelResult, Target
        from judge.signals import summarize

        rows = self.rows(model, n)
        return ModelResult(Target(model, self.engine.url, label), None, rows, summarize(rows),
                           self._seconds.get(model, 0.0))


# -- offline: sample once from base, judge, train with `odpo train` ------------------------------------------
def sample_offline_pairs(engine: Engine, judge, seed: int, budget: int, train_prompts: int) -> tuple[list, dict]:
    """`budget` pairs from base samples of the train prompts (the online loop's order, cycled), made as the
    online judge makes them; returns (pairs, stats)."""
    from transformers import AutoTokenizer

    from generator.sampler import Sampler, ServerFailed
    from judge.pairs import PairPolicy, build_pairs
    from core.contracts import SamplingParams
    from core.settings import CommonSettings, GeneratorSettings, JudgeSettings
    from service.task import make_prompts

    gen = GeneratorSettings()
    sampler = Sampler(engine.client, AutoTokenizer.from_pretrained(engine.model), engine.adapters, gen)
    policy = PairPolicy.from_settings(JudgeSettings())
    prompts = make_prompts("train", train_prompts, curriculum=CommonSettings().task_curriculum)  # as `odpo up`

    def params(k: int) -> SamplingParams:  # a fresh seed per pass over the prompts: base repeats itself otherwise
        return SamplingParams(n=gen.n, temperature=gen.temperature, top_p=gen.top_p, max_tokens=gen.max_tokens,
                              seed=seed + 100_003 * (k // len(prompts)))

    def sample(k: int):
        for attempt in range(3):
            try:
                return sampler.sample(prompts[k % len(prompts)], params=params(k))
            except ServerFailed:
                if attempt == 2:
                    raise
                time.sleep(2)

    pairs, seen, dropped = [], set(), Counter()
    sets = 0
    t0 = time.monotonic()
    # Sampling runs ahead while the judge works, in prompt order (the online loop overlaps them too).
    with ThreadPoolExecutor(max_workers=gen.max_in_flight) as pool:
        ahead = deque(pool.submit(sample, k) for k in range(2 * gen.max_in_flight))
        try:
            while len(pairs) < budget:
                if sets >= 20 * len(prompts):
                    raise BenchFailed(f"offline s{seed}: only {len(pairs)} pairs from {sets} candidate sets")
                cset = ahead.popleft().result()
                ahead.append(pool.submit(sample, sets + len(ahead) + 1))
                sets += 1
                judgement = judge.judge(cset.prompt, [c.text for c in cset.completions])
                made, why = build_pairs(cset, judgement, judge.name, policy)
                dropped.update(why)
                for p in made:
                    if p.id not in seen and len(pairs) < budget:
                        seen.add(p.id)
                        pairs.append(p)
                if sets % 16 == 0 or len(pairs) == budget:
                    say(f"  offline s{seed}: {len(pairs)}/{budget} pairs from {sets} base candidate sets "
                        f"({time.monotonic() - t0:.0f}s)")
        finally:
            for f in ahead:
                f.cancel()
    stats = {"candidate_sets": sets, "pairs": len(pairs), "dropped": dict(dropped),
             "sampling_s": round(time.monotonic() - t0, 1),
             "sampling": {"n": gen.n, "temperature": gen.temperature, "top_p": gen.top_p, "max_tokens": gen.max_tokens,
                          "seed": f"{seed} (+100003 per pass over the prompts)"}}
    return pairs, stats


def train_offline(seed: int, pairs_file: Path, store: Path, window: int, model: Path, log_file: Path) -> list[dict]:
    """`odpo train` over the file, one version per window; each row gets `wall_s` since the process started."""
    cmd = [odpo_bin(), "train", "--pairs", str(pairs_file), "--store", str(store), "--window-pairs", str(window)]
    env = {**os.environ, "ODPO_TRAINER_SEED": str(seed), "ODPO_BASE_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
    say(f"offline s{seed}: {' '.join(cmd)} (ODPO_TRAINER_SEED={seed}); log {log_file}")
    rows = []
    t0 = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        try:
            for line in proc.stdout:
                with open(log_file.with_suffix(".jsonl"), "a") as out:
                    out.write(line)
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "version" in row:
                    row["wall_s"] = round(time.monotonic() - t0, 1)
                    rows.append(row)
                    say(f"  offline s{seed}: v{row['version']} trained ({row['pairs']} pairs, loss "
                        f"{row['loss']:.4f}, reward margin {row['reward_margin']:.3f}, {row['seconds']:.0f}s)")
            rc = proc.wait()
        finally:
            _stop(proc, grace_s=10)
    if rc != 0:
        raise BenchFailed(f"offline s{seed}: `odpo train` exited with {rc}; last lines of {log_file}:\n"
                          f"{tail(log_file)}")
    if not rows:
        raise BenchFailed(f"offline s{seed}: `odpo train` published no version; see {log_file}")
    return rows


def offline_arm(engine: Engine, judge, seed: int, args, out: Path, model: Path) -> dict:
    from core.contracts import version_name

    folder = out / f"offline-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh store: `odpo train` would resume an old one
    folder.mkdir(parents=True)
    say(f"offline s{seed}: sampling {args.pairs} pairs once from base")
    pairs, stats = sample_offline_pairs(engine, judge, seed, args.pairs, args.train_prompts)
    pairs_file = folder / "pairs.jsonl"
    pairs_file.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    versions = train_offline(seed, pairs_file, folder / "store", args.window, model, folder / "train.log")
    start = engine.server.startup_s + stats["sampling_s"]  # like `odpo up`, the clock includes starting vLLM
    cumulative = 0
    for row in versions:
        cumulative += row["pairs"]
        row.update(pairs_trained=cumulative, wall_s=round(start + row["wall_s"], 1),
                   name=f"offline-s{seed}-v{row['version']}",
                   folder=str(folder / "store" / version_name(row["version"])))
    last = versions[-1]
    return {"folder": str(folder), "pairs_file": str(pairs_file), **stats,
            "vllm_start_s": round(engine.server.startup_s, 1), "versions": versions,
            "final_version": last["version"], "final_pairs": last["pairs_trained"], "final_wall_s": last["wall_s"]}


def offline_curve(evaluator: Evaluator, engine: Engine, arm: dict, base_sig: dict, every: int, n: int) -> list[dict]:
    curve = [{"version": 0, "pairs": 0, "wall_s": 0.0, "n": n, "signals": base_sig}]
    versions = arm["versions"]
    for i, row in enumerate(versions):
        if (i + 1) % every and row is not versions[-1]:
            continue
        engine.load(row["name"], Path(row["folder"]))
        try:
            sig = evaluator.result(row["name"], row["name"], n).signals
        finally:
            if row is not versions[-1]:  # the final version is evaluated again, on more prompts
                engine.unload(row["name"])
        curve.append({"version": row["version"], "pairs": row["pairs_trained"], "wall_s": row["wall_s"], "n": n,
                      "signals": curve_signals(sig)})
        say(f"  curve {row['name']}: score {sig['score']:.3f}, {sig['mean_words']:.1f} words, on topic "
            f"{_f(sig['on_topic_share'], 2)}, ref lp {_f(sig['ref_logprob'], 2)} ({n} prompts)")
    return curve

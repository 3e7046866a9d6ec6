"""Does the online loop help clients? Online DPO vs offline DPO vs base, the same pair budget, real parts.

For each seed and one pair budget (`--pairs`, in windows of `--window`):

- ONLINE: the real loop, `odpo up --rounds R --window-pairs W` (R = pairs / W), as a subprocess with
  ODPO_TRAINER_SEED and ODPO_GENERATOR_SEED set to the seed; or an existing run folder of it
  (`--reuse-online SEED=DIR`). Its learning curve comes from what the promotion gate already scored:
  every version's per-prompt rows and publish time in DIR/store/gateway-registry.json (nothing is
  re-evaluated for the curve).
- OFFLINE: the same number of pairs sampled ONCE from base (the generator's sampler: n=4, temperature 1,
  48 tokens, the train prompts in the online loop's order), judged by the online judge
  (`make_judge(JudgeSettings())`: rules x quality guard with the reference log-prob) into pairs by the
  online pair policy, then trained with `odpo train` (window W, the trainer's defaults, same seed).
  Its curve: every `--curve-every`-th version scored here on the same first `--curve-prompts` held-out
  prompts the gate scores first; wall time = vLLM start + sampling + the training process up to that version.
  With the same seed, both arms sample the first window from base with the same per-request seed: online v1
  and offline v1 came out equal in a test here, and the arms part from v2 on (on-policy data or not).
- BASE.

Final comparison on the first `--heldout` held-out prompts (greedy, 48 tokens): base, each seed's online
final version (the newest in its store within the budget; also the promoted one if it differs) and
offline final version, all served by one vLLM started here (adapters under names like `online-s0-v10`),
with the task score (95% bootstrap interval), strict pass, win rate against base (the composite judge
asked in both orders, ties apart) and the degeneration signals (words, empty share, distinct-2, on-topic
share, reference log-prob per token); online against offline head to head as well. Writes
OUT/efficacy.json and OUT/efficacy.png (learning curves against pairs trained and wall time) and prints
the tables.

    flock /tmp/odpo-vllm.lock .venv/bin/python -m benchmarks.efficacy [--pairs 160] [--window 16] \\
        [--seeds 0 1] [--heldout 100] [--curve-prompts 48] [--out runs/efficacy] \\
        [--reuse-online 0=runs/up-s0 1=runs/up-s1] [--skip-online]

An online run takes about half an hour per 10 windows on 2 cores; `--reuse-online` takes one from
`odpo up --rounds R --window-pairs W --run-dir DIR` run by hand (with ODPO_TRAINER_SEED/ODPO_GENERATOR_SEED).
"""

from __future__ import annotations

import argparse
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
from rich.console import Console

from benchmarks.common import model_dir, quiet_logs
from benchmarks.efficacy_report import _f, plot_curves, side_by_side

CURVE_SIGNALS = ("score", "score_ci", "strict_pass", "mean_words", "empty_share", "distinct2", "on_topic_share",
                 "ref_logprob", "guard_pass")
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
    from service.broker import free_port

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

    summary_file, registry_file = run_dir / "summary.json", run_dir / "store" / "gateway-registry.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    registry = json.loads(registry_file.read_text()) if registry_file.is_file() else None
    if summary is None and registry is None:
        raise BenchFailed(f"{run_dir}: neither summary.json nor store/gateway-registry.json: not an `odpo up` run")
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
            sig, n, source = _curve_signals(summarize(rows)), len(rows), "gate"
        elif srow.get("score") is not None:  # no registry: the summary's numbers (on the gate's prompt count)
            sig, n, source = _curve_signals({**srow, "score": srow["score"]}), srow.get("prompts_scored"), "summary"
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
            p["signals"] = _curve_signals(evaluator.result(name, name, n).signals)
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


def _curve_signals(sig: dict) -> dict:
    return {k: sig.get(k) for k in CURVE_SIGNALS}


# -- one vLLM for sampling and evaluation ---------------------------------------------------------------------
class Engine:
    """The vLLM server of this benchmark: `base` as the zero adapter, adapters loaded and unloaded by name."""

    def __init__(self, model: Path, out: Path):
        from generator.server import VllmServer
        from service.settings import GeneratorSettings

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
    from service.contracts import SamplingParams
    from service.settings import GeneratorSettings, JudgeSettings
    from service.task import make_prompts

    gen = GeneratorSettings()
    sampler = Sampler(engine.client, AutoTokenizer.from_pretrained(engine.model), engine.adapters, gen)
    policy = PairPolicy.from_settings(JudgeSettings())
    prompts = make_prompts("train", train_prompts)

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
    from service.contracts import version_name

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
                      "signals": _curve_signals(sig)})
        say(f"  curve {row['name']}: score {sig['score']:.3f}, {sig['mean_words']:.1f} words, on topic "
            f"{_f(sig['on_topic_share'], 2)}, ref lp {_f(sig['ref_logprob'], 2)} ({n} prompts)")
    return curve


def parse_reuse(items: list[str], seeds: list[int], ap: argparse.ArgumentParser) -> dict[int, Path]:
    reuse = {}
    for item in items:
        seed, sep, folder = item.partition("=")
        if not sep or not seed.strip().lstrip("-").isdigit():
            ap.error(f"--reuse-online {item!r}: use SEED=DIR (an `odpo up` run folder)")
        if int(seed) not in seeds:
            ap.error(f"--reuse-online {item!r}: seed {seed} is not in --seeds {seeds}")
        if not Path(folder).is_dir():
            ap.error(f"--reuse-online {item!r}: {folder} is not a folder")
        reuse[int(seed)] = Path(folder).resolve()
    return reuse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=160, help="pair budget of each trained arm (whole windows)")
    ap.add_argument("--window", type=int, default=16, help="pairs per DPO update (one version each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="trainer and sampling seeds")
    ap.add_argument("--heldout", type=int, default=100, help="held-out prompts of the final comparison")
    ap.add_argument("--curve-prompts", type=int, default=48, help="first held-out prompts of the learning curves")
    ap.add_argument("--curve-every", type=int, default=1, help="score every k-th offline version (and online version "
                                                               "the gate skipped) for the curves; the final always")
    ap.add_argument("--max-tokens", type=int, default=48, help="new tokens per greedy held-out answer (the gate's)")
    ap.add_argument("--train-prompts", type=int, default=256, help="train prompts cycled through (as `odpo up`)")
    ap.add_argument("--out", type=Path, default=Path("runs/efficacy"), help="folder of the results and runs")
    ap.add_argument("--reuse-online", nargs="+", default=[], metavar="SEED=DIR",
                    help="take the online arm of SEED from an existing `odpo up --rounds R` run folder")
    ap.add_argument("--skip-online", action="store_true", help="no online arm (offline vs base only)")
    ap.add_argument("--online-timeout-min", type=float, default=240, help="give up on one `odpo up` after this")
    ap.add_argument("--examples", type=int, default=3, help="held-out prompts whose answers are printed")
    args = ap.parse_args()
    if args.window < 1 or args.pairs < args.window or args.pairs % args.window:
        ap.error(f"--pairs must be a positive multiple of --window ({args.pairs} / {args.window})")
    if min(args.heldout, args.curve_prompts, args.curve_every) < 1:
        ap.error("--heldout, --curve-prompts and --curve-every must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds must differ")
    reuse = {} if args.skip_online else parse_reuse(args.reuse_online, args.seeds, ap)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        run_dir = out / f"online-s{seed}"
        if not args.skip_online and seed not in reuse and run_dir.exists():
            ap.error(f"{run_dir} exists (an earlier online run?): pass --reuse-online {seed}={run_dir} or remove it")
    quiet_logs()
    signal.signal(signal.SIGTERM, _interrupt)  # stops like Ctrl-C: `odpo up`, `odpo train` and vLLM go too
    try:
        return run(args, out, reuse)
    except (BenchFailed, httpx.HTTPError) as exc:
        print(f"efficacy: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("efficacy: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args, out: Path, reuse: dict[int, Path]) -> int:
    from judge.eval_report import examples, results_table
    from judge.evaluate import compare_models, win_rate
    from judge.stats import paired_difference
    from service.task import make_prompts

    model = model_dir()
    budget, rounds = args.pairs, args.pairs // args.window
    say(f"efficacy: {budget} pairs ({rounds} windows of {args.window}) per trained arm, seeds {args.seeds}; "
        f"base model {model}; out {out}")
    arms: dict[int, dict] = {s: {} for s in args.seeds}
    if not args.skip_online:  # before our own vLLM starts: `odpo up` runs its own
        for seed in args.seeds:
            run_dir = reuse.get(seed) or out / f"online-s{seed}"
            if seed not in reuse:
                run_online(seed, run_dir, args, out / f"online-s{seed}.log")
            arms[seed]["online"] = read_online(seed, run_dir, budget, args.window, args.curve_prompts)
            a = arms[seed]["online"]
            say(f"online s{seed}: {run_dir}: final v{a['final_version']} ({a['final_pairs']} pairs), promoted "
                f"v{a['promoted_version']}, {sum(p['source'] == 'gate' for p in a['curve'])} of "
                f"{len(a['curve'])} versions scored by the gate" + (f"; {a['note']}" if a["note"] else ""))

    import torch

    from judge.base import make_judge
    from judge.fluency import ReferenceScorer
    from service.settings import JudgeSettings

    torch.set_num_threads(1)  # vLLM computes on the other core
    say("loading the online judge (rules x quality guard, reference log-prob)")
    judge = make_judge(JudgeSettings(), reference_model=model)
    reference = getattr(getattr(judge, "guard", None), "reference", None) or ReferenceScorer(model)
    n_eval = max(args.heldout, args.curve_prompts)
    prompts = make_prompts("heldout", n_eval)
    engine = Engine(model, out)
    try:
        engine.start(out)
        for seed in args.seeds:
            arms[seed]["offline"] = offline_arm(engine, judge, seed, args, out, model)
        evaluator = Evaluator(engine, prompts, args.max_tokens, reference)
        say(f"scoring base on {n_eval} held-out prompts")
        base_curve = _curve_signals(evaluator.result("base", "base", args.curve_prompts).signals)
        for seed in args.seeds:
            if arms[seed].get("online"):
                say(f"online s{seed}: scoring the versions the gate did not score, for the learning curve")
                fill_online_curve(evaluator, engine, seed, arms[seed]["online"], args.curve_every,
                                  args.curve_prompts)
            say(f"offline s{seed}: learning curve on {args.curve_prompts} held-out prompts")
            arms[seed]["offline"]["curve"] = offline_curve(evaluator, engine, arms[seed]["offline"], base_curve,
                                                           args.curve_every, args.curve_prompts)
        # the final comparison: base first (the reference), then per seed online final, promoted, offline final
        results, labels = [evaluator.result("base", "base", args.heldout)], {}
        for seed in args.seeds:
            on, off = arms[seed].get("online"), arms[seed]["offline"]
            wanted = []
            if on:
                wanted.append(("online", on["final_version"], Path(on["store"])))
                if on["promoted_version"] not in (None, 0, on["final_version"]):
                    wanted.append(("online-promoted", on["promoted_version"], Path(on["store"])))
            wanted.append(("offline", off["final_version"], Path(off["folder"]) / "store"))
            for kind, version, store in wanted:
                name = f"{kind.split('-')[0]}-s{seed}-v{version}"
                label = f"{kind} s{seed} v{version}"
                say(f"final: {label} on {args.heldout} held-out prompts")
                engine.load(name, store / f"policy-v{version}")
                results.append(evaluator.result(name, label, args.heldout))
                engine.unload(name)
                labels[(seed, kind)] = len(results) - 1
    finally:
        engine.stop()
        say("vLLM stopped")

    say("judging win rates (both orders)")
    final_prompts = prompts[:args.heldout]
    compare_models(results, 0, final_prompts, judge)
    by_seed = {}
    for seed in args.seeds:
        entry = {}
        for kind in ("online", "online-promoted", "offline"):
            if (seed, kind) in labels:
                r = results[labels[(seed, kind)]]
                arm = arms[seed]["online" if kind.startswith("online") else "offline"]
                entry[kind] = {"label": r.target.label, "version": int(r.target.model.rsplit("-v", 1)[1]),
                               "pairs": arm["final_pairs"] if kind != "online-promoted" else None,
                               "signals": r.signals, "win_rate_vs_base": r.versus.get("win_rate"),
                               "score_difference_vs_base": r.versus.get("score_difference")}
        if "online" in entry:
            on, off = results[labels[(seed, "online")]], results[labels[(seed, "offline")]]
            entry["head_to_head"] = {
                "score_difference": paired_difference([x.score for x in on.rows],
                                                      [x.score for x in off.rows]).as_dict(),
                "strict_difference": paired_difference([float(x.strict) for x in on.rows],
                                                       [float(x.strict) for x in off.rows]).as_dict(),
                "win_rate": win_rate(judge, final_prompts, on.rows, off.rows)}
        by_seed[str(seed)] = entry
    final = {"prompts": args.heldout, "max_tokens": args.max_tokens, "decoding": "greedy (temperature 0)",
             "base": {"signals": results[0].signals}, "by_seed": by_seed}

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 220)
    console.print()
    for line in examples(results, final_prompts, args.examples):
        console.print(line, markup=False, highlight=False)
    console.print(results_table(results, f"all models: {args.heldout} held-out prompts, greedy, {args.max_tokens} "
                                         f"tokens; reference base; win rate by the composite judge"))
    if args.skip_online:
        console.print("(--skip-online: no online arm)")
    console.print(side_by_side(final, args.seeds, arms))
    for seed in args.seeds:
        if (arms[seed].get("online") or {}).get("note"):
            console.print(f"online s{seed}: {arms[seed]['online']['note']}")

    result = {
        "settings": {"pairs": budget, "window": args.window, "rounds": rounds, "seeds": args.seeds,
                     "heldout_prompts": args.heldout, "curve_prompts": args.curve_prompts,
                     "max_tokens": args.max_tokens, "decoding": "greedy", "base_model": str(model),
                     "judge": f"make_judge(JudgeSettings()): {type(judge).__name__}({judge.name})",
                     "wall_time": "online: since `odpo up` started (admin-token file), to each version's publish "
                                  "time; offline: vLLM start + sampling + the `odpo train` process up to each version",
                     "online_curve": "the promotion gate's per-prompt rows (first curve_prompts held-out prompts); "
                                     "versions it skipped (superseded) scored here (source: benchmark)",
                     "skip_online": args.skip_online},
        "arms": {str(s): a for s, a in arms.items()},
        "base_curve_signals": base_curve,
        "final": final,
        "models": [r.as_dict() for r in results],
    }
    (out / "efficacy.json").write_text(json.dumps(result, indent=1))
    png = plot_curves(arms, base_curve, args.curve_prompts, out / "efficacy.png")
    say(f"written: {out / 'efficacy.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

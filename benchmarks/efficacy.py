"""Does the online loop help clients? Online DPO vs offline DPO vs base, the same pair budget, real parts.

For each seed and one pair budget (`--pairs`, in windows of `--window`):

- ONLINE: the real loop, `odpo up --rounds R --window-pairs W` (R = pairs / W), as a subprocess with
  ODPO_TRAINER_SEED and ODPO_GENERATOR_SEED set to the seed; or an existing run folder of it
  (`--reuse-online SEED=DIR`). Its learning curve comes from what the promotion gate (`odpo gate`) already
  scored: every version's per-prompt rows and publish time in DIR/store/gate-registry.json (in a run folder
  of an earlier odpo, DIR/store/gateway-registry.json; nothing is re-evaluated for the curve).
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
import signal
import sys
from pathlib import Path

import httpx
from rich.console import Console

from benchmarks.common import model_dir, quiet_logs
from benchmarks.efficacy_arms import (
    BenchFailed,
    Engine,
    Evaluator,
    curve_signals,
    fill_online_curve,
    offline_arm,
    offline_curve,
    read_online,
    run_online,
    say,
)
from benchmarks.efficacy_report import plot_curves, side_by_side


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
    ap.add_argument("--ifeval", type=Path, default=None, metavar="FILE",
                    help="also score every final model on this public benchmark (IFEval JSONL; a copy: "
                         "benchmarks/data/ifeval/input_data.jsonl), official checkers, paired against base")
    ap.add_argument("--ifeval-limit", type=int, default=None, help="only the first N benchmark prompts")
    ap.add_argument("--ifeval-max-tokens", type=int, default=256, help="new tokens per benchmark answer")
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


class Benchmark:
    """The public benchmark beside the bundled held-out set: every final model's answers, checked officially."""

    def __init__(self, args, out: Path):
        from service.eval_suite import load_items

        self.path, self.max_tokens = args.ifeval, args.ifeval_max_tokens
        self.items = load_items(args.ifeval, args.ifeval_limit, out / "nltk_data")
        self.models: list[dict] = []

    def score(self, engine, name: str, label: str) -> None:
        from judge.evaluate import Target
        from service.eval_suite import answer_and_check

        say(f"ifeval: {label} on {len(self.items)} benchmark prompts")
        self.models.append(answer_and_check(self.items, Target(name, engine.url, label), self.max_tokens, 8))

    def report(self) -> dict:
        from service.eval_suite import compare

        return compare(self.items, self.models, 0, self.path, self.max_tokens)

    def table(self):
        from service.eval_suite import benchmark_table

        return benchmark_table(self.models, f"ifeval ({self.path.name})", len(self.items), self.max_tokens, "base")


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

    from judge.registry import make_judge
    from judge.fluency import ReferenceScorer
    from core.settings import CommonSettings, JudgeSettings

    torch.set_num_threads(1)  # vLLM computes on the other core
    say("loading the online judge (rules x quality guard, reference log-prob)")
    judge = make_judge(JudgeSettings(), reference_model=model)
    reference = getattr(getattr(judge, "guard", None), "reference", None) or ReferenceScorer(model)
    n_eval = max(args.heldout, args.curve_prompts)
    prompts = make_prompts("heldout", n_eval, curriculum=CommonSettings().task_curriculum)
    bench = Benchmark(args, out) if args.ifeval else None
    engine = Engine(model, out)
    try:
        engine.start(out)
        for seed in args.seeds:
            arms[seed]["offline"] = offline_arm(engine, judge, seed, args, out, model)
        evaluator = Evaluator(engine, prompts, args.max_tokens, reference)
        say(f"scoring base on {n_eval} held-out prompts")
        base_curve = curve_signals(evaluator.result("base", "base", args.curve_prompts).signals)
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
        if bench:
            bench.score(engine, "base", "base")
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
                if bench:
                    bench.score(engine, name, label)
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
             "base": {"signals": results[0].signals}, "by_seed": by_seed,
             "ifeval": bench.report() if bench else None}

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 220)
    console.print()
    for line in examples(results, final_prompts, args.examples):
        console.print(line, markup=False, highlight=False)
    console.print(results_table(results, f"all models: {args.heldout} held-out prompts, greedy, {args.max_tokens} "
                                         f"tokens; reference base; win rate by the composite judge"))
    if bench:
        console.print(bench.table())
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

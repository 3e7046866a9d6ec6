"""`odpo eval`: compare models served at OpenAI-compatible URLs on held-out prompts (judge/evaluate.py).

    odpo eval --models base,policy                      # the local gateway (http://127.0.0.1:8000)
    odpo eval --models base,policy-v3,other=mymodel@http://host:8100 --prompts 200 --out runs/eval
    odpo eval --suite bundled --suite ifeval=benchmarks/data/ifeval/input_data.jsonl   # + a public benchmark

Each model answers the same prompts greedily; the first model (or
`--reference`) is the reference for the paired score difference and the win
rate. Prints a table and example answers, writes eval.json and eval.png.
`--suite ifeval=FILE` adds a public instruction-following benchmark scored by
its official checkers (service/eval_suite.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from core.errors import UsageError
from service.eval_suite import served_by


@dataclass
class EvalOptions:
    models: list[str]
    url: str
    reference: str | None
    prompts: int
    prompts_file: Path | None
    max_tokens: int
    out: Path | None
    reference_logprob: bool
    win_judge: str
    concurrency: int
    examples: int
    base_model: Path | None
    suites: list[str] = field(default_factory=lambda: ["bundled"])
    suite_max_tokens: int = 256
    suite_limit: int | None = None
    api_key: str | None = None  # sent as `Authorization: Bearer` to every model's URL (vLLM's API key)


def parse_targets(specs: list[str], default_url: str, api_key: str | None = None):
    """`name`, `label=name` or `label=name@url` -> Targets (labels unique), each sending `api_key` as
    `Authorization: Bearer` when one is given."""
    from judge.evaluate import Target

    targets = []
    for spec in specs:
        label, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
        model, _, url = rest.partition("@")
        if not model:
            raise UsageError(f"bad model spec {spec!r}: use NAME, LABEL=NAME or LABEL=NAME@URL")
        targets.append(Target(model, (url or default_url).rstrip("/").removesuffix("/v1"), label or model,
                              {"Authorization": f"Bearer {api_key}"} if api_key else {}))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise UsageError(f"model labels must differ: {', '.join(labels)} (name them: LABEL=NAME@URL)")
    return targets


def load_prompts(opts: EvalOptions):
    from service.task import make_prompts

    if opts.prompts < 1:
        raise UsageError("--prompts must be >= 1")
    if opts.prompts_file is None:
        from core.settings import CommonSettings

        return make_prompts("heldout", opts.prompts, curriculum=CommonSettings().task_curriculum)
    from core.dataset_load import load_file

    try:
        loaded = load_file(opts.prompts_file, "prompts")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {opts.prompts_file}: {exc}") from None
    if loaded.errors:
        line, why = loaded.errors[0]
        raise UsageError(f"{opts.prompts_file}:{line}: {why} ({len(loaded.errors)} bad line(s))")
    prompts = [m for _, m in loaded.messages][:opts.prompts]
    untasked = [p.id for p in prompts if not p.task]
    if untasked:
        raise UsageError(f"{opts.prompts_file}: prompt {untasked[0]!r} has no `task`: a task score needs one")
    if not prompts:
        raise UsageError(f"{opts.prompts_file} holds no prompts")
    return prompts


def _win_judge(kind: str, reference):
    if kind == "none":
        return None
    from judge.registry import make_plugin
    from core.settings import JudgeSettings

    if kind == "llm_judge":
        return make_plugin(JudgeSettings(judge="llm_judge"))
    from judge.composite import CompositeJudge
    from judge.quality import QualityGuard

    return CompositeJudge(make_plugin(JudgeSettings(judge="verifier")), QualityGuard(reference=reference))


def run_eval(opts: EvalOptions) -> int:
    from service.eval_suite import parse_suites, run_benchmark
    from core.settings import CommonSettings

    console = Console(soft_wrap=True)
    targets = parse_targets(opts.models, opts.url, opts.api_key)
    labels = [t.label for t in targets]
    if opts.reference is not None and opts.reference not in labels:
        raise UsageError(f"--reference {opts.reference!r} is not one of the models: {', '.join(labels)}")
    if opts.concurrency < 1 or opts.max_tokens < 1 or opts.suite_max_tokens < 1:
        raise UsageError("--concurrency, --max-tokens and --suite-max-tokens must be >= 1")
    if opts.suite_limit is not None and opts.suite_limit < 1:
        raise UsageError("--suite-limit must be >= 1")
    suites = parse_suites(opts.suites)
    ref_index = labels.index(opts.reference) if opts.reference else 0
    settings = {"reference": labels[ref_index], "suites": opts.suites}
    out = (opts.out or Path("runs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    results, written = [], []
    if any(s.name == "bundled" for s in suites):
        results = _run_bundled(opts, targets, ref_index, console)
        settings.update({"prompts": len(results[0].rows),
                         "prompts_file": str(opts.prompts_file) if opts.prompts_file else None,
                         "max_tokens": opts.max_tokens, "win_judge": opts.win_judge,
                         "reference_logprob": opts.reference_logprob})
    benchmarks = {s.name: run_benchmark(s, targets, ref_index, opts.suite_max_tokens, opts.suite_limit,
                                        opts.concurrency, CommonSettings().cache_dir / "nltk_data", console)
                  for s in suites if s.path is not None}
    out.mkdir(parents=True, exist_ok=True)
    from judge.eval_report import plot_results, write_json

    written.append(write_json(results, settings, out / "eval.json", benchmarks))
    if results:
        written.append(plot_results(results, out / "eval.png"))
    console.print(f"written: {', '.join(map(str, written))}")
    return 0


def _run_bundled(opts: EvalOptions, targets, ref_index: int, console: Console) -> list:
    from judge.eval_report import examples, results_table
    from judge.evaluate import compare_models, evaluate_model

    prompts = load_prompts(opts)
    reference = None
    if opts.reference_logprob:
        from judge.fluency import CachedScorer, ReferenceScorer
        from core.assets import AssetError, base_model_dir
        from core.settings import CommonSettings

        common = CommonSettings()
        try:
            reference = CachedScorer(ReferenceScorer(base_model_dir(common.cache_dir,
                                                                    opts.base_model or common.base_model)))
        except (AssetError, OSError) as exc:
            raise UsageError(f"cannot load the reference model: {exc} (or pass --no-reference-logprob)") from None
    results = []
    with Progress(console=console, transient=True) as progress:
        for t in targets:
            progress.add_task(f"{t.label}: {len(prompts)} prompts at {t.url}", total=None)
            with served_by(t):
                results.append(evaluate_model(t, prompts, opts.max_tokens, reference, concurrency=opts.concurrency))
    compare_models(results, ref_index, prompts, _win_judge(opts.win_judge, reference))
    for line in examples(results, prompts, opts.examples):
        console.print(line, markup=False, highlight=False)
    console.print(results_table(results, f"odpo eval: {len(prompts)} prompts, greedy, max {opts.max_tokens} "
                                         f"tokens; reference {targets[ref_index].label}"))
    return results

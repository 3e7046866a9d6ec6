"""Rule checks a program can run on a response, chosen by the prompt's task metadata.

`score_task(task, text)` dispatches on `task["kind"]`:

- `constraints`: the bundled constraint task (`judge/verifier.py`), partial credit in [0, 1];
- `exact`: `{"kind": "exact", "answer": "Paris" | ["Paris", "paris, france"], "case_sensitive": false}`
  1 when the response, whitespace collapsed and trimmed of surrounding quotes and final
  punctuation, equals one of the answers, else 0;
- `regex`: `{"kind": "regex", "pattern": "\\\\b42\\\\b", "fullmatch": false, "ignore_case": false}`
  1 when the pattern matches (searches, or matches the whole stripped response), else 0;
  run by the `regex` library with a time limit (`regex_timeout_s`, ODPO_JUDGE_REGEX_TIMEOUT_S);
- `callable`: `{"kind": "callable", "path": "pkg.mod:fn", "args": {...}}` calls `fn(text, **args)`
  and takes its number (a bool is 0 or 1; anything else must be a finite number).

A callable path is code named by a message: anyone who can write to odpo.prompts
could otherwise make the judge call `os:system` on a response. So the `callable`
kind only runs functions whose module is listed in `allowed_modules` (a setting,
empty by default: the kind is off).

A regex pattern is code too: a catastrophic one (`(a|a)+$`) backtracks for
hours on a long answer, and since the judge commits its offset only after the
work, the same message would hang it again after every restart. So every match
runs with a time limit; an answer whose match runs out of time scores 0 (it
did not show that it meets the constraint), the timeout is logged once per
pattern and counted (`odpo_judge_regex_timeouts_total`), and the loop goes on.
Scoring rather than dead-lettering keeps the other answers' scores (a pattern
may be slow only on one pathological answer) and needs no retry state.
Patterns are also bounded in length where a prompt is accepted
(core/contracts.py, `MAX_REGEX_PATTERN_CHARS`).

Anything malformed raises `ValueError`; the judge dead-letters that candidate set.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from typing import Any, Callable, Sequence

import regex

from core.contracts import MAX_REGEX_PATTERN_CHARS
from judge import verifier
from judge.metrics import REGEX_TIMEOUTS

log = logging.getLogger(__name__)

REGEX_TIMEOUT_S = 0.1  # default of JudgeSettings.regex_timeout_s
_TIMED_OUT: set[str] = set()  # patterns whose timeout was logged (each once; bounded below)
_TIMED_OUT_LOCK = threading.Lock()

_TRIM = " \t\r\n\"'`*.!?;:"


def _exact(task: dict[str, Any], text: str, allowed: Sequence[str], timeout_s: float) -> float:
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


def _regex(task: dict[str, Any], text: str, allowed: Sequence[str], timeout_s: float) -> float:
    _only(task, {"pattern"}, {"fullmatch", "ignore_case"})
    pattern, full, icase = task["pattern"], task.get("fullmatch", False), task.get("ignore_case", False)
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("regex: `pattern` must be a non-empty string")
    if len(pattern) > MAX_REGEX_PATTERN_CHARS:
        raise ValueError(f"regex: a pattern may have at most {MAX_REGEX_PATTERN_CHARS} characters")
    if not isinstance(full, bool) or not isinstance(icase, bool):
        raise ValueError("regex: `fullmatch` and `ignore_case` must be true or false")
    try:
        rx = regex.compile(pattern, regex.IGNORECASE if icase else 0)
    except regex.error as exc:
        raise ValueError(f"regex: bad pattern {pattern!r}: {exc}") from None
    try:
        hit = rx.fullmatch(text.strip(), timeout=timeout_s) if full else rx.search(text, timeout=timeout_s)
    except TimeoutError:
        _timed_out(pattern, len(text), timeout_s)
        return 0.0
    return 1.0 if hit else 0.0


def _timed_out(pattern: str, chars: int, timeout_s: float) -> None:
    REGEX_TIMEOUTS.inc()
    with _TIMED_OUT_LOCK:
        if pattern in _TIMED_OUT:
            return
        if len(_TIMED_OUT) >= 1000:  # a stream of distinct patterns: keep the memory bounded, log again
            _TIMED_OUT.clear()
        _TIMED_OUT.add(pattern)
    log.warning("regex task: the pattern %r ran out of its %.3f s on a %d-character answer; that answer scores 0 "
                "(logged once per pattern; odpo_judge_regex_timeouts_total counts each)", pattern[:200], timeout_s,
                chars)


def _callable(task: dict[str, Any], text: str, allowed: Sequence[str], timeout_s: float) -> float:
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


_KINDS: dict[str, Callable[[dict[str, Any], str, Sequence[str], float], float]] = {
    "exact": _exact,
    "regex": _regex,
    "callable": _callable,
}
KINDS = (verifier.TASK_KIND, *_KINDS)


def strict_task(task: Any, text: str, allowed_modules: Sequence[str] = (),
                regex_timeout_s: float = REGEX_TIMEOUT_S) -> bool:
    """True when `text` meets the task in full (every constraint; a score of 1 for the other kinds)."""
    if isinstance(task, dict) and task.get("kind") == verifier.TASK_KIND:
        return verifier.strict_pass(task, text)
    return score_task(task, text, allowed_modules, regex_timeout_s) >= 1.0


def score_task(task: Any, text: str, allowed_modules: Sequence[str] = (),
               regex_timeout_s: float = REGEX_TIMEOUT_S) -> float:
    """The rule score of `text` for `task`; `ValueError` for a task no rule here can judge."""
    if not isinstance(task, dict):
        raise ValueError(f"task must be a mapping, got {type(task).__name__}")
    kind = task.get("kind")
    if kind == verifier.TASK_KIND:
        return verifier.score(task, text)
    if kind not in _KINDS:
        raise ValueError(f"the verifier judges tasks of kind {', '.join(map(repr, KINDS))}; got kind {kind!r}")
    return _KINDS[kind](task, text, allowed_modules, regex_timeout_s)

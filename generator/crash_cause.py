"""What killed a vLLM server, read from its log: the root exception and where it was raised.

vLLM's processes log a fatal error several times over: the worker's own
exception (`KeyError: np.int64(6)`), then the engine core's wrapper
(`RuntimeError: Worker failed with error ...`), then the API server's
(`EngineDeadError`). The cause is the last exception in the log that is not
such a wrapper, and its innermost frame outside list comprehensions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "(Worker pid=2451) ERROR 12-07 09:45:06 [multiproc_executor.py:1063] " before each line of a process's log
_PREFIX = re.compile(r"^\(\w+ pid=\d+\)\s+[A-Z]+\s+\S+\s+\S+\s+\[[^\]]*\]\s?")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)')
_WRAPPERS = {"EngineDeadError", "EngineGenerateError", "SystemExit", "KeyboardInterrupt", "CancelledError"}
_WRAPPER_MESSAGES = ("Worker failed with error", "EngineCore encountered")


@dataclass(frozen=True)
class CrashCause:
    kind: str  # the exception's class name, `killed` when the log names none (a signal, the OOM killer)
    message: str
    where: str = ""

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message}" if self.message else self.kind
        return f"{text} at {self.where}" if self.where else text


KILLED = CrashCause("killed", "vLLM's log names no exception (a signal or the OOM killer?)")


def crash_cause(log_text: str) -> CrashCause:
    """The cause of the death whose log `log_text` ends with (the log since the server started)."""
    lines = [_PREFIX.sub("", line) for line in log_text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        match = _EXCEPTION.match(lines[i].strip())
        if match is None:
            continue
        kind, message = match.group(1), (match.group(2) or "").strip()
        if kind in _WRAPPERS or any(w in message for w in _WRAPPER_MESSAGES):
            continue
        return CrashCause(kind, message[:200], _innermost_frame(lines[:i]))
    return KILLED


def _innermost_frame(lines: list[str]) -> str:
    """`path:line in function` of the last frame before an exception line (site-packages/ cut off)."""
    for line in reversed(lines[-200:]):
        frame = _FRAME.match(line)
        if frame and not frame.group(3).startswith("<"):
            path = frame.group(1).split("site-packages/", 1)[-1]
            return f"{path}:{frame.group(2)} in {frame.group(3)}"
        if line.startswith("Traceback"):
            break
    return ""

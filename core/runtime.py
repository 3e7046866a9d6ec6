"""What every component process does on start: logging, a stop event for SIGINT/SIGTERM, /metrics."""

from __future__ import annotations

import ctypes
import json
import logging
import re
import signal
import sys
import threading
import time

from prometheus_client import start_http_server

# A component that knows why it is about to exit logs one line holding this marker and the reason; its
# supervisor (`odpo up`) puts the reason on its "exited" line.
EXIT_CAUSE = "exit cause: "


# Fields a log call may add with `extra=` that the JSON lines carry (the gateway's access log, request ids).
LOG_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "model", "policy_version", "client",
              "engine", "key_id")


class JsonLines(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, Elasticsearch, Cloud Logging) parse without rules."""

    def __init__(self, component: str | None = None):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if self.component:
            line["component"] = self.component
        line.update({k: getattr(record, k) for k in LOG_FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


_KAFKA_SECURITY = re.compile(r"auth|sasl|ssl|certificate|credential", re.IGNORECASE)


def kafka_quiet(record: logging.LogRecord) -> bool:
    """kafka-python's warnings (a reconnect at every broker restart) are left out, except those about logins,
    permissions and TLS (e.g. "Not authorized to read from topic", "SASL re-authentication failed")."""
    if not record.name.startswith("kafka") or record.levelno >= logging.ERROR:
        return True
    return bool(_KAFKA_SECURITY.search(record.getMessage()))


def setup_logging(level: str = "INFO", fmt: str = "text", component: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(component) if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(kafka_quiet)
    logging.basicConfig(level=level.upper(), handlers=[handler])  # a no-op where logging is set up already
    logging.getLogger("kafka").setLevel(logging.WARNING)  # and `kafka_quiet` keeps only what says something
    logging.getLogger("httpx").setLevel(logging.WARNING)


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM; long-running loops check it and exit cleanly."""
    stop = threading.Event()

    def _handler(signum, frame):
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
    return stop


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Expose the default Prometheus registry on `host:port` (0 = a free port); returns the port."""
    server, _thread = start_http_server(port, addr=host)
    return server.server_port


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGKILL when its parent dies, so nothing is left running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: callers still stop their children explicitly
        pass

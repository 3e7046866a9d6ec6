"""The vLLM supervisor treats a server whose process lives but no longer answers /health as dead.

Seen in chaos runs: after its engine core died, vLLM's API server waited forever in uvicorn's graceful
shutdown ("Waiting for connections to close"), with its port closed and its process alive. That hang
cannot be produced on demand with vLLM, so the server process here is a tiny HTTP server (a real process
and real HTTP) that answers /health for a moment, then closes its port and sleeps, as the hung server did.
"""

from __future__ import annotations

import sys
import threading
import time

from generator.server import Supervisor, VllmServer
from core.settings import GeneratorSettings

HANGS = """
import http.server, sys, threading, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
time.sleep(float(sys.argv[2]))
srv.shutdown(); srv.server_close()   # the port closes, the process stays
time.sleep(600)
"""


class HangingServer(VllmServer):
    def __init__(self, healthy_s: float, tmp_path):
        super().__init__(tmp_path, GeneratorSettings(vllm_port=0), log_file=tmp_path / "server.log")
        self.healthy_s = healthy_s

    def command(self) -> list[str]:
        return [sys.executable, "-c", HANGS, str(self.port), str(self.healthy_s)]

    def environment(self) -> dict[str, str]:
        return {}


def test_a_server_alive_but_not_answering_is_killed_and_reported_dead(tmp_path):
    server = HangingServer(healthy_s=2.0, tmp_path=tmp_path).start(timeout_s=30)
    pid, died, causes = server.pid, threading.Event(), []
    supervisor = Supervisor(server, on_tick=lambda: None, check_every_s=0.3, hung_after_s=2.0,
                            on_death=lambda cause, tail: (causes.append(cause), died.set()))
    halt = threading.Event()
    t = threading.Thread(target=supervisor.run, args=(halt,), daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        assert server.running and server.healthy() and not died.is_set()  # healthy: left alone
        assert died.wait(20), "a server that stopped answering was never declared dead"
        assert not server.running
        assert [c.kind for c in causes] == ["killed"], "its log names no exception: counted as killed"
        try:
            import os

            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, "the hung process was not killed"
    finally:
        halt.set()
        server.stop(grace_s=1)

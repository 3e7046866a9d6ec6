"""Starting, attaching to and failing to start the vLLM server."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from prometheus_client import REGISTRY

from generator.adapters import AdapterManager
from generator.server import ServerError, Supervisor, VllmServer
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.settings import CommonSettings, GatewaySettings, GeneratorSettings
from tests.gateway_server import running_gateway


def test_a_taken_port_is_refused_before_starting(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = VllmServer(model_dir, GeneratorSettings(vllm_port=port), log_file=tmp_path / "vllm.log")
        with pytest.raises(ServerError, match="port is taken"):
            server.start()
        assert server.pid is None


def test_command_carries_the_settings(model_dir, tmp_path):
    settings = GeneratorSettings(vllm_port=0, max_lora_rank=16, max_loras=3, max_model_len=1024, kv_cache_gib=1,
                                 extra_args=["--seed", "3"])
    server = VllmServer(model_dir, settings, log_file=tmp_path / "vllm.log")
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", str(model_dir)), ("--port", str(server.port)), ("--dtype", "float32"),
                        ("--max-lora-rank", "16"), ("--max-loras", "3"), ("--max-cpu-loras", "6"),
                        ("--max-model-len", "1024")):
        assert cmd[cmd.index(flag) + 1] == value
    roomy = VllmServer(model_dir, settings.model_copy(update={"max_cpu_loras": 10})).command()
    assert roomy[roomy.index("--max-cpu-loras") + 1] == "10"
    assert "--enable-lora" in cmd and cmd[-2:] == ["--seed", "3"]
    env = server.environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto" and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    pinned = VllmServer(model_dir, GeneratorSettings(vllm_port=0, cpu_threads_bind="2-3", cpu_reserved_cores=2))
    assert pinned.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "2-3"
    assert pinned.environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"


@pytest.mark.vllm
def test_vllm_metrics_stay_reachable(vllm_server):
    """Dashboards scrape vLLM's own /metrics next to odpo's."""
    resp = httpx.get(f"{vllm_server.url}/metrics", timeout=10)
    assert resp.status_code == 200
    for name in ("vllm:num_requests_running", "vllm:generation_tokens_total", "vllm:lora_requests_info",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in resp.text, f"{name} missing from vLLM's /metrics"


@pytest.mark.vllm
def test_a_server_that_exits_fails_fast_with_its_log(model_dir, tmp_path):
    settings = GeneratorSettings(vllm_port=0, extra_args=["--no-such-flag"])
    server = VllmServer(model_dir, settings, log_file=tmp_path / "vllm.log")
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        server.start(timeout_s=300)
    assert time.monotonic() - t0 < 120, "an exited server is noticed at once, not at the timeout"
    assert "exited with code" in str(err.value) and "--no-such-flag" in str(err.value)
    assert not server.running


@pytest.mark.vllm
def test_attaching_to_an_external_server_never_stops_it(vllm_server, model_dir):
    external = VllmServer(model_dir, GeneratorSettings(vllm_url=vllm_server.url + "/"))
    assert external.start(timeout_s=10).url == vllm_server.url
    assert external.running
    external.stop()
    assert vllm_server.running and vllm_server.healthy()


@pytest.mark.vllm
def test_supervisor_restarts_a_dead_server_and_restores_its_adapters(model_dir, vllm_store, broker, tmp_path):
    """The engine core dies under requests a gateway is relaying: they get 503 with Retry-After (the stream an
    error event), the death is counted with its cause, the server comes back with `base`, the gateway serves."""
    # Pinned to core 1 (auto would take core 0): this second server also shows the core setting reaches vLLM.
    server = VllmServer(model_dir, GeneratorSettings(vllm_port=0, startup_timeout_s=300, cpu_threads_bind="1"),
                        log_file=tmp_path / "vllm.log")
    halt = threading.Event()
    supervisor_thread = None
    with httpx.Client(base_url=server.url, timeout=60) as client:
        adapters = AdapterManager(client, vllm_store, model_dir)
        supervisor = Supervisor(server, adapters.resync, check_every_s=0.5, backoff_s=0.5)
        # Started from the supervisor's thread too, as PR_SET_PDEATHSIG follows the spawning thread.
        started = threading.Event()
        supervisor_thread = threading.Thread(target=lambda: (server.start(), started.set(), supervisor.run(halt)))
        supervisor_thread.start()
        settings = GatewaySettings(vllm_url=server.url, request_timeout_s=120)
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=vllm_store)
        try:
            assert started.wait(300), f"vLLM did not start:\n{server.log_tail()}"
            adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
            first_pid = server.pid
            crashes = _engine_crashes()
            with running_gateway(settings, common) as gateway, ThreadPoolExecutor(2) as pool:
                long = {"model": "base", "prompt": "Once upon a time", "n": 8, "max_tokens": 300,
                        "temperature": 1.0, "seed": 7}
                plain = pool.submit(httpx.post, f"{gateway}/v1/completions", json=long, timeout=120)
                streamed = pool.submit(_streamed, f"{gateway}/v1/completions", {**long, "stream": True})
                time.sleep(4)
                assert not plain.done() and not streamed.done(), "both requests are in flight at the kill"
                engine = [p for p in psutil.Process(first_pid).children(recursive=True) if "EngineCore" in p.name()]
                engine[0].kill()
                resp = plain.result()
                assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0, resp.text
                assert resp.json()["error"]["code"] == "engine_unavailable"
                assert '"error"' in streamed.result(), "the stream ends with an error event"
                deadline = time.monotonic() + 300
                while supervisor.restarts < 1 or "base" not in _served(server.url):
                    assert time.monotonic() < deadline, f"vLLM was not restarted:\n{server.log_tail()}"
                    time.sleep(0.5)
                assert server.pid != first_pid and server.healthy()
                assert REGISTRY.get_sample_value("odpo_generator_server_restarts_total") >= 1
                assert _engine_crashes() == crashes + 1, "the death is counted, by the cause its log names"
                time.sleep(settings.engine_down_s)  # marked down by the 503: routed to again after this
                again = httpx.post(f"{gateway}/v1/completions", timeout=120,
                                   json={"model": "base", "prompt": "Hi", "max_tokens": 2})
                assert again.status_code == 200, "the restarted server serves `base` again, through the gateway"
        finally:
            halt.set()
            supervisor_thread.join(timeout=30)
            server.stop()


def _engine_crashes() -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "odpo_generator_engine_crashes"
               for s in m.samples if s.name.endswith("_total"))


def _streamed(url: str, body: dict) -> str:
    with httpx.stream("POST", url, json=body, timeout=120) as resp:
        return "".join(resp.iter_text())


def _served(url: str) -> set[str]:
    try:
        return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]}
    except httpx.HTTPError:
        return set()

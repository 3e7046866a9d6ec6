"""vLLM's API key: the generator starts vLLM with one, and every odpo client of vLLM sends it.

With a key (`ODPO_GENERATOR_VLLM_API_KEY`), vLLM answers 401 on /v1/* (inference, model listing, runtime LoRA
loading and unloading) without `Authorization: Bearer <key>`; /health stays open for probes. The
generator's loader, the gateway (forwarding and its engine loader) and the gate's scoring send the key of
their own setting. The vLLM tests start one server of their own with a key (about a minute).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.settings import CommonSettings, GateSettings, GatewaySettings, GeneratorSettings, TrainerSettings

KEY = "vllm-test-key-7f3a"


# -- without vLLM ------------------------------------------------------------------------------------------------
def test_the_key_is_read_from_a_setting_or_a_file(tmp_path, monkeypatch):
    from pydantic import ValidationError

    (tmp_path / "key").write_text(KEY + "\n")
    for cls in (GeneratorSettings, GatewaySettings, GateSettings):
        assert cls().vllm_headers() == {}
        assert cls(vllm_api_key=KEY).vllm_headers() == {"Authorization": f"Bearer {KEY}"}
        assert cls(vllm_api_key_file=tmp_path / "key").vllm_key() == KEY
        with pytest.raises(ValidationError, match="not both"):
            cls(vllm_api_key=KEY, vllm_api_key_file=tmp_path / "key")
    monkeypatch.setenv("ODPO_GATEWAY_VLLM_API_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("ODPO_GATE_VLLM_API_KEY", KEY)
    assert GatewaySettings().vllm_key() == GateSettings().vllm_key() == KEY


def test_vllm_gets_its_key_and_none_of_odpos_secrets(tmp_path, monkeypatch):
    """The key goes in as VLLM_API_KEY (vLLM's own equivalent of --api-key; not on the command line, which
    `ps` shows); odpo's settings, Kafka's password and the admin token among them, stay out of vLLM."""
    from generator.server import VllmServer

    monkeypatch.setenv("ODPO_KAFKA_SASL_PASSWORD", "kafka-secret")
    monkeypatch.setenv("ODPO_GATE_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("VLLM_API_KEY", "inherited")
    server = VllmServer(tmp_path, GeneratorSettings(vllm_port=1, vllm_api_key=KEY), lora_store=tmp_path)
    env = server.environment()
    assert env["VLLM_API_KEY"] == KEY
    assert [k for k in env if k.startswith("ODPO_")] == ["ODPO_LORA_STORE"]
    assert KEY not in " ".join(server.command())
    keyless = VllmServer(tmp_path, GeneratorSettings(vllm_port=1), lora_store=tmp_path).environment()
    assert "VLLM_API_KEY" not in keyless, "an inherited key would lock out clients that have none"


def test_odpo_up_gives_each_secret_only_to_the_components_that_use_it(tmp_path):
    from service.up import COMPONENTS, UpOptions, _child_env, _secret_env

    opts = UpOptions(rounds=1, port=8000, run_dir=tmp_path, train_prompts=4, heldout_prompts=4,
                     heldout_prompts_max=4, window_pairs=None, pair_backlog=None, metrics_port=0)
    shared = _child_env("127.0.0.1:9092", tmp_path, opts, tmp_path, GeneratorSettings(), TrainerSettings())
    assert not [k for k in shared if k.endswith(("_TOKEN", "_KEY", "_PASSWORD"))], shared
    assert shared["ODPO_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    secrets = _secret_env("admin", "vllm")
    assert secrets == {"gate": {"ODPO_GATE_ADMIN_TOKEN": "admin", "ODPO_GATE_VLLM_API_KEY": "vllm"},
                       "generator": {"ODPO_GENERATOR_VLLM_API_KEY": "vllm"},
                       "gateway": {"ODPO_GATEWAY_VLLM_API_KEY": "vllm"}}
    assert set(secrets) <= {name for name, _, _ in COMPONENTS}


def test_odpo_eval_sends_its_key_to_every_model(tmp_path, monkeypatch):
    from service.eval_run import parse_targets

    targets = parse_targets(["base", "p=policy@http://h:1"], "http://g:8000", KEY)
    assert [t.headers for t in targets] == [{"Authorization": f"Bearer {KEY}"}] * 2
    assert parse_targets(["base"], "http://g:8000")[0].headers == {}


# -- on a real vLLM started with a key -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_vllm(model_dir, tmp_path_factory):
    """A vLLM of this module's own, started by the generator's VllmServer with an API key."""
    from generator.server import VllmServer

    store = tmp_path_factory.mktemp("keyed-store")
    log_file = tmp_path_factory.mktemp("keyed-log") / "vllm.log"
    server = VllmServer(model_dir, GeneratorSettings(vllm_port=0, startup_timeout_s=900, vllm_api_key=KEY),
                        log_file=log_file, lora_store=store)
    server.start()
    server.store = store
    yield server
    server.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.integration
@pytest.mark.vllm
def test_vllm_refuses_every_v1_request_without_the_key(keyed_vllm, model_dir):
    from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter

    url = keyed_vllm.url
    folder = str(write_zero_adapter(model_dir, keyed_vllm.store / ZERO_ADAPTER_DIR))
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key
    refused = [("GET", "/v1/models", None),
               ("POST", "/v1/load_lora_adapter", {"lora_name": "intruder", "lora_path": folder}),
               ("POST", "/v1/unload_lora_adapter", {"lora_name": "base"}),
               ("POST", "/v1/chat/completions", {"model": "base", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})]
    for method, path, body in refused:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert resp.status_code == 401, (path, headers, resp.status_code, resp.text[:200])
    assert httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    pid = keyed_vllm.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"VLLM_API_KEY={KEY}".encode() in environ
    assert not [v for v in environ if v.startswith(b"ODPO_") and not v.startswith(b"ODPO_LORA_STORE=")]


@pytest.mark.integration
@pytest.mark.vllm
def test_the_generator_loader_the_gateway_and_the_gate_scoring_send_the_key(keyed_vllm, model_dir, own_broker):
    from core.contracts import PromptEvent
    from generator.adapters import AdapterManager
    from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
    from judge.evaluate import answer_prompts
    from tests.gateway_server import running_gateway

    url, store = keyed_vllm.url, keyed_vllm.store
    # the generator's loader (its client carries the generator's key): runtime LoRA loading with the key works
    with httpx.Client(base_url=url, timeout=120, headers=GeneratorSettings(vllm_api_key=KEY).vllm_headers()) as c:
        AdapterManager(c, store, model_dir).register_base(write_zero_adapter(model_dir, store / ZERO_ADAPTER_DIR))
    assert "base" in {m["id"] for m in httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"]}

    # the gate's scoring path (judge/evaluate.py answer_prompts, with the gate's engine headers)
    prompt = PromptEvent(id="k1", text="Name a color.")
    answers, _ = answer_prompts(url, "base", [prompt], 4, headers=GateSettings(vllm_api_key=KEY).vllm_headers())
    assert answers[0]
    with pytest.raises(httpx.HTTPStatusError, match="401"):
        answer_prompts(url, "base", [prompt], 4)

    common = CommonSettings(bootstrap_servers=own_broker.bootstrap, store_dir=store)
    chat = {"model": "policy", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a color."}]}
    with running_gateway(GatewaySettings(vllm_url=url, vllm_api_key=KEY), common) as gateway:
        resp = httpx.post(f"{gateway}/v1/chat/completions", json=chat, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
    with running_gateway(GatewaySettings(vllm_url=url), common) as keyless:
        resp = httpx.post(f"{keyless}/v1/chat/completions", json=chat, timeout=120)
        assert resp.status_code != 200, "a gateway without the key must not be served"
        assert httpx.get(f"{keyless}/readyz", timeout=30).status_code == 503


"""Issue 18 on real vLLM: a version unloaded while another client's request on it runs, then asked for again,
killed the engine (`KeyError` in `convert_mapping`). vLLM 0.32 hashes a LoRARequest by name: the name came back
under a second id beside the first one's running request, a batch activated only one of the two, and once its
LRU moved the other out of its slot the worker died. The generator unloaded the version because it counted
only its own requests; the gateway, the gate and the store resolver use the same engine.

Now no name is unloaded while a load of it could succeed again; only the names of versions whose folders
retention deleted go (`AdapterManager.forget_deleted`). Versions used here (names on the shared server must
not collide): 121-128.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client import REGISTRY

from generator.adapters import AdapterManager
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from tests.test_generator_swap import make_peft_model, publish_adapter, randomize_lora_b, served

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def peft_model(model_dir):
    return make_peft_model(model_dir)


@pytest.fixture()
def publish(peft_model, vllm_store, model_dir, announce):
    """Publish and announce `policy-v<v>` in the shared store, as the trainer does."""
    def _publish(v: int):
        randomize_lora_b(peft_model, seed=v)
        ready = publish_adapter(peft_model, vllm_store, v, model_dir)
        announce(ready)
        return ready
    return _publish


def generator_manager(vllm_server, vllm_store, model_dir) -> AdapterManager:
    adapters = AdapterManager(httpx.Client(base_url=vllm_server.url, timeout=300), vllm_store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, vllm_store / ZERO_ADAPTER_DIR))
    return adapters


def ask(url: str, model: str, max_tokens: int) -> int:
    """One greedy completion from a client that is not the generator (the gate, a gateway); its status."""
    resp = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True})
    return resp.status_code


def vllm_log_since(server, offset: int) -> str:
    with open(server.log_file, errors="replace") as f:
        f.seek(offset)
        return f.read()


def test_a_version_asked_for_by_another_client_across_newer_versions_keeps_the_engine_alive(
        vllm_server, vllm_store, model_dir, publish):
    readies = {v: publish(v) for v in range(121, 126)}
    log_offset = vllm_server.log_file.stat().st_size
    manager = generator_manager(vllm_server, vllm_store, model_dir)
    url = vllm_server.url
    assert manager.apply(readies[121])
    with ThreadPoolExecutor(12) as pool:
        # the gate scores v121 through the same engine: a long request on it is running ...
        first = pool.submit(ask, url, "policy-v121", 96)
        time.sleep(2)
        # ... while the trainer publishes v122 and v123 and the generator swaps to them (the old generator
        # unloaded v121 here: none of *its* requests used it) ...
        assert manager.apply(readies[122]) and manager.apply(readies[123])
        # ... and the gate asks for v121 again, while clients use base and newer versions (two of them only
        # through the store resolver), more adapters than the engine has slots for
        again = pool.submit(ask, url, "policy-v121", 64)
        time.sleep(1)
        others = []
        for k, model in enumerate(["base", "policy-v122", "policy-v123", "policy-v124", "policy-v125"] * 2):
            others.append(pool.submit(ask, url, model, 12))
            time.sleep(0.5)
        statuses = [f.result() for f in [first, again, *others]]
    log = vllm_log_since(vllm_server, log_offset)
    assert "KeyError" not in log and "EngineDeadError" not in log, log[-3000:]
    assert vllm_server.healthy(), "the engine survived"
    assert statuses == [200] * 12, statuses
    assert {"policy-v121", "policy-v122", "policy-v123"} <= served(url), "no version that can be asked for left"
    manager.client.close()


def test_only_the_names_of_versions_retention_deleted_are_unloaded(vllm_server, vllm_store, model_dir, publish,
                                                                   tmp_path):
    readies = {v: publish(v) for v in (126, 127, 128)}
    manager = generator_manager(vllm_server, vllm_store, model_dir)
    url = vllm_server.url
    for v in (126, 127, 128):
        assert manager.apply(readies[v])
    assert ask(url, "policy-v126", 4) == 200
    assert "policy-v126" not in manager.forget_deleted(), "its folder is in the store: it stays"

    # retention deletes v126 (manifest, then folder) while nothing uses it
    (vllm_store / "announced" / "policy-v126.json").unlink()
    shutil.rmtree(vllm_store / "policy-v126")
    unloads = REGISTRY.get_sample_value("odpo_generator_unloads_total") or 0
    gone = manager.forget_deleted()
    assert "policy-v126" in gone and all(not (vllm_store / name).exists() for name in gone)
    assert REGISTRY.get_sample_value("odpo_generator_unloads_total") >= unloads + 1
    listed = served(url)
    assert "policy-v126" not in listed and {"policy-v127", "policy-v128", "base"} <= listed
    assert REGISTRY.get_sample_value("odpo_generator_loaded_versions") == \
        sum(1 for n in listed if n.startswith("policy-v"))
    assert ask(url, "policy-v126", 4) == 404, "a deleted version cannot be registered again"
    assert manager.loaded_versions()[-2:] == [127, 128] and 126 not in manager.loaded_versions()

    # a store that looks empty (a volume that went away) is not read as "every version was deleted"
    blind = AdapterManager(manager.client, tmp_path / "empty-store", model_dir)
    assert blind.forget_deleted() == [] and {"policy-v127", "policy-v128"} <= served(url)
    manager.client.close()

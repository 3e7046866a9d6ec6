"""The vLLM LoRA resolver over the adapter store (generator/lora_resolver.py), in the real vLLM server.

The session's vLLM runs with `ODPO_LORA_STORE` = its store: a request for an announced `policy-v<N>` that
nobody loaded is served (the same answers as the adapter loaded by hand), and a folder that was not
announced, or whose bytes do not match the announcement, is not.
"""

from __future__ import annotations

import json

import httpx

from tests.gateway_server import noisy_adapter, register_base

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]


def _ask(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": PROMPT, "temperature": 0.0, "max_tokens": 12})


def _listed(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_announced_version_is_served_on_first_request(vllm_server, vllm_store, model_dir, announce):
    url = vllm_server.url
    register_base(url, model_dir, vllm_store)
    ready = noisy_adapter(vllm_store, model_dir, 9101, scale=0.05, seed=3)
    announce(ready)
    assert "policy-v9101" not in _listed(url)

    lazy = _ask(url, "policy-v9101")
    assert lazy.status_code == 200, lazy.text
    assert lazy.json()["model"] == "policy-v9101"
    assert "policy-v9101" in _listed(url)

    # the same folder loaded by hand under another name answers the same; base answers otherwise
    loaded = httpx.post(f"{url}/v1/load_lora_adapter",
                        json={"lora_name": "resolver-check-9101", "lora_path": str(vllm_store / ready.path)})
    assert loaded.status_code == 200, loaded.text
    text = lazy.json()["choices"][0]["message"]["content"]
    assert _ask(url, "resolver-check-9101").json()["choices"][0]["message"]["content"] == text
    assert _ask(url, "base").json()["choices"][0]["message"]["content"] != text


def test_unannounced_or_altered_folders_are_not_served(vllm_server, vllm_store, model_dir, announce):
    url = vllm_server.url
    noisy_adapter(vllm_store, model_dir, 9102, scale=0.05, seed=4)  # in the store, never announced
    resp = _ask(url, "policy-v9102")
    assert resp.status_code == 404, resp.text

    ready = noisy_adapter(vllm_store, model_dir, 9103, scale=0.05, seed=5)
    announce(ready.model_copy(update={"sha256": "0" * 64}))
    resp = _ask(url, "policy-v9103")
    assert resp.status_code == 404, resp.text
    assert "policy-v9103" not in _listed(url)

    resp = _ask(url, "policy-v9104")  # nothing at all
    assert resp.status_code == 404 and json.loads(resp.text)["error"]

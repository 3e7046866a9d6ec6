"""Hot swap under live traffic on the real vLLM server.

The same prompt gets the new version's answer right after a swap (no stale
prefix-cache blocks), requests in flight across a swap finish on the version
they started on, and `base` batched with two versions matches HF (+peft)
token for token for each.

Versions used here (names on the shared server must not collide): 41-42, 51-52, 61-62, 71-72.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from transformers import AutoTokenizer

from generator.adapters import AdapterManager, AdapterRejected
from generator.sampler import Sampler
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.adapter_store import adapter_digest
from core.contracts import PromptEvent
from core.settings import GeneratorSettings
from tests.test_generator_swap import failures, hf_greedy, make_peft_model, publish_adapter, randomize_lora_b, served

pytestmark = pytest.mark.vllm

QUESTIONS = ["Give me two tips for learning to cook.", "What is the boiling point of water?"]
# Over one KV block (128 tokens on vLLM's CPU backend), so a repeat of it is a prefix-cache hit.
LONG_QUESTION = ("You are helping a small bakery write its weekly newsletter. The bakery sells sourdough bread, "
                 "rye bread, spelt loaves, baguettes, croissants, pain au chocolat, cinnamon rolls, cardamom "
                 "buns, lemon cake, carrot cake and seasonal fruit tarts. It opens at seven every morning except "
                 "Monday, when it is closed, and on Saturdays it also sells coffee and hot chocolate at a stall "
                 "by the river. This week the old oven was finally repaired after three weeks of waiting for a "
                 "spare part, a new apprentice called Mira started on Tuesday and has already learned to shape "
                 "baguettes, the plum tarts are back now that the plums in the orchard are ripe, and on Friday "
                 "evening there will be a bread-baking class for children. Customers have asked whether the "
                 "rye bread can be sliced in the shop, and from now on it can. Write the opening sentence.")


@pytest.fixture(scope="module")
def peft_model(model_dir):
    return make_peft_model(model_dir)


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    sampler = Sampler(None, AutoTokenizer.from_pretrained(model_dir), None, GeneratorSettings())
    return lambda text: sampler.prompt_token_ids(PromptEvent(id="q", messages=[{"role": "user", "content": text}]))


@pytest.fixture()
def client(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=300) as c:
        yield c


def make_manager(client, store, model_dir) -> AdapterManager:
    adapters = AdapterManager(client, store, model_dir)
    adapters.register_base(write_zero_adapter(model_dir, store / ZERO_ADAPTER_DIR))
    return adapters


def complete(manager: AdapterManager, name: str | None, ids: list[int], max_tokens: int,
             ignore_eos: bool = False) -> tuple[list[int], str, int]:
    """One greedy completion: (token ids up to the first EOS, the response's `model`, the version lent)."""
    with manager.using(name) as (served_name, version):
        resp = manager.client.post("/v1/completions", json={
            "model": served_name, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, "ignore_eos": ignore_eos})
    assert resp.status_code == 200, resp.text
    tokens = resp.json()["choices"][0]["token_ids"]
    eos = 2  # <|im_end|>; HF's generate stops there, so compare up to it
    return (tokens[:tokens.index(eos) + 1] if eos in tokens else tokens), resp.json()["model"], version


def vllm_gauge(url: str, name: str) -> float:
    """Sum of one vLLM metric over its label sets (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_the_same_prompt_after_a_swap_gets_the_new_versions_answer(client, vllm_server, vllm_store, model_dir,
                                                                   peft_model, prompt_ids):
    manager = make_manager(client, vllm_store, model_dir)
    ids = prompt_ids(LONG_QUESTION)
    # Larger weights than elsewhere: the long prompt pins the first tokens down at the default scale.
    randomize_lora_b(peft_model, seed=41, scale=0.2)
    manager.apply(publish_adapter(peft_model, vllm_store, 41, model_dir))
    expected41 = hf_greedy(peft_model, ids)
    first = complete(manager, None, ids, 16)
    hits = vllm_gauge(vllm_server.url, "vllm:prefix_cache_hits_total")
    assert complete(manager, None, ids, 16) == first
    assert vllm_gauge(vllm_server.url, "vllm:prefix_cache_hits_total") > hits, "the repeat hit the prefix cache"

    randomize_lora_b(peft_model, seed=42, scale=0.2)
    manager.apply(publish_adapter(peft_model, vllm_store, 42, model_dir))
    after = complete(manager, None, ids, 16)
    assert first == (expected41, "policy-v41", 41)
    assert after == (hf_greedy(peft_model, ids), "policy-v42", 42), "the cached v41 prefix was not reused"
    assert after[0] != first[0]


def test_requests_in_flight_across_a_swap_finish_on_their_version(client, vllm_server, vllm_store, model_dir,
                                                                  peft_model, prompt_ids):
    manager = make_manager(client, vllm_store, model_dir)
    ids = [prompt_ids(q) for q in QUESTIONS]
    randomize_lora_b(peft_model, seed=52)
    ready52 = publish_adapter(peft_model, vllm_store, 52, model_dir)
    randomize_lora_b(peft_model, seed=51)
    manager.apply(publish_adapter(peft_model, vllm_store, 51, model_dir))
    url, tokens = vllm_server.url, 32
    # Each request generates far more than is compared (ignore_eos keeps it going), so all 16 stay in
    # flight together even on a slow, loaded machine; only the first `tokens` are checked against HF.
    in_flight_tokens = 192
    busy = lambda: vllm_gauge(url, "vllm:num_requests_running") + vllm_gauge(url, "vllm:num_requests_waiting")
    # When each request was sent and answered, on the client's clock. The overlap of the two groups is judged
    # from these, not from polling vLLM's gauges: on a loaded machine one /metrics call can take longer than
    # the 16 requests (CI once polled peak 0 while all 8 older requests were still running at the swap).
    timed = lambda *args: (time.monotonic(), complete(*args), time.monotonic())
    with ThreadPoolExecutor(16) as pool:
        before = [pool.submit(timed, manager, None, ids[i % 2], in_flight_tokens, True) for i in range(8)]
        deadline = time.monotonic() + 120
        while busy() < 8:
            assert not any(f.done() for f in before), f"a request finished before all 8 reached vLLM: " \
                                                      f"{[f.result()[1][1:] for f in before if f.done()]}"
            assert time.monotonic() < deadline, f"the first 8 requests never ran together (busy={busy()})"
            time.sleep(0.05)
        manager.apply(ready52)
        running_at_swap = sum(not f.done() for f in before)
        after = [pool.submit(timed, manager, None, ids[i % 2], in_flight_tokens, True) for i in range(8)]
        spans = [f.result() for f in before + after]
    results = [result for _, result, _ in spans]
    assert running_at_swap == 8, "the 8 older requests were still running when v52 was applied"
    last_sent = max(sent for sent, _, _ in spans[8:])
    first_done = min(done for _, _, done in spans[:8])
    assert last_sent < first_done, f"all 16 requests were in flight together: the last newer one was sent " \
                                   f"{last_sent - first_done:.2f} s after the first older one was answered"
    assert [r[1:] for r in results] == [("policy-v51", 51)] * 8 + [("policy-v52", 52)] * 8
    expected = {}
    for v in (51, 52):
        randomize_lora_b(peft_model, seed=v)
        expected[v] = [hf_greedy(peft_model, i, tokens) for i in ids]
    for k, (out, _, version) in enumerate(results):
        assert out[:tokens] == expected[version][k % 2], f"request {k} on v{version} mixed weights"
    assert expected[51] != expected[52]
    # v51 stays registered after its requests drained: another client may still ask for it, and unloading it
    # under such a request killed the engine (tests/test_generator_unload_race.py)
    assert "policy-v51" in served(url) and manager.loaded_versions() == [0, 51, 52]


def test_base_and_two_versions_batched_together_each_match_hf(client, vllm_store, model_dir, peft_model,
                                                              prompt_ids):
    manager = make_manager(client, vllm_store, model_dir)
    for v in (61, 62):
        randomize_lora_b(peft_model, seed=v)
        manager.apply(publish_adapter(peft_model, vllm_store, v, model_dir))
    ids = [prompt_ids(q) for q in QUESTIONS]
    jobs = [(name, k) for name in ("base", "policy-v61", "policy-v62") for k in range(len(ids))]
    with ThreadPoolExecutor(len(jobs)) as pool:  # at once, so vLLM batches the three models together
        outputs = list(pool.map(lambda j: complete(manager, j[0], ids[j[1]], 24), jobs))
    assert [o[1] for o in outputs] == [name for name, _ in jobs]

    expected = {}
    with peft_model.disable_adapter():
        expected["base"] = [hf_greedy(peft_model, i, 24) for i in ids]
    for v in (61, 62):
        randomize_lora_b(peft_model, seed=v)
        expected[f"policy-v{v}"] = [hf_greedy(peft_model, i, 24) for i in ids]
    for (name, k), (out, _, _) in zip(jobs, outputs):
        assert out == expected[name][k], f"{name} on prompt {k} differs from HF"
    answers = {tuple(map(tuple, expected[name])) for name in expected}
    assert len(answers) == 3, "the three models answer differently (on at least one prompt)"


def test_weights_vllm_cannot_load_are_refused_and_the_server_keeps_serving(client, vllm_server, vllm_store,
                                                                           model_dir, peft_model, prompt_ids):
    """Files that pass the checksum (the publisher hashed them broken) but that vLLM refuses."""
    manager = make_manager(client, vllm_store, model_dir)
    randomize_lora_b(peft_model, seed=71)
    manager.apply(publish_adapter(peft_model, vllm_store, 71, model_dir))
    ids = prompt_ids(QUESTIONS[0])
    before = complete(manager, None, ids, 12)

    randomize_lora_b(peft_model, seed=72)
    broken = publish_adapter(peft_model, vllm_store, 72, model_dir)
    weights = vllm_store / broken.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file ...
    broken = broken.model_copy(update={"sha256": adapter_digest(vllm_store / broken.path)})  # ... hashed as is
    load_failures = failures("load")
    with pytest.raises(AdapterRejected, match="vLLM refused to load policy-v72"):
        manager.apply(broken)
    assert failures("load") == load_failures + 1
    assert vllm_server.healthy() and "policy-v72" not in served(vllm_server.url)
    assert manager.current_version == 71
    assert complete(manager, None, ids, 12) == before, "v71 keeps serving the same answers"

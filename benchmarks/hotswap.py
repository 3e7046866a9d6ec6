"""Hot swap vs full-weight reload: how long until a new policy version answers its first request.

Hot swap (odpo): the real generator service (`generator.service.run`, attached to
a vLLM server by URL) follows `odpo.adapters` on the real embedded broker. For
each version the clock starts when `AdapterReady` is published and stops when
the first completion asked of `policy-v<N>` comes back (the client asks again
every few ms and gets 404 until the version is served).

Full weights (what RL stacks without LoRA serving do): from the same moment,
merge the adapter into the base weights (peft `merge_and_unload`), save the
merged model, then either
  - restart: stop the vLLM server and start a new one on the merged folder, or
  - reload: tell the running server to reload its weights from the merged folder
    (vLLM's dev-mode `/collective_rpc reload_weights`, then reset the prefix cache),
and stop the clock at the first completion. Both serve without LoRA, as such a
stack would, eager like the LoRA server unless `--compile`. A restart takes
tens of seconds, so a few are run (`--restarts`, `--reloads`).

    flock /tmp/odpo-vllm.lock python -m benchmarks.hotswap [--swaps 12] [--restarts 3] [--reloads 5]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import chat_prompt_ids, model_dir, peft_model, quiet_logs, summary, write_adapters, write_json
from generator.server import VllmServer
from core.broker import EmbeddedBroker
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, AdapterReady
from core.topics import topic_name
from core.settings import CommonSettings, GeneratorSettings

SERVED_NAME = "policy"  # the full-weight server's model name


class FullWeightServer(VllmServer):
    """vLLM on a plain (merged) model folder, LoRA off, dev mode on for `reload_weights`.

    vLLM's CPU build turns torch.compile off whenever LoRA is on; without LoRA it compiles at every
    start (about 40 s more here, and its cache did not save a restart that). `compile=False` runs
    eager like the LoRA server: like for like, and the fastest restart the full-weight path can get.
    """

    compile = False

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("--enable-lora")
        del cmd[i:i + 7]  # --enable-lora --max-lora-rank R --max-loras N --max-cpu-loras M
        return cmd + ["--served-model-name", SERVED_NAME] + ([] if self.compile else
                                                             ["--compilation-config", '{"mode": 0}'])

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "VLLM_SERVER_DEV_MODE": "1"}


def first_completion(client: httpx.Client, model: str, ids: list[int], timeout_s: float = 600) -> float:
    """Ask `model` for one token until it answers; returns time.time() of the answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            resp = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1,
                                                        "temperature": 0.0})
        except httpx.TransportError:  # a restarting server
            resp = None
        if resp is not None and resp.status_code == 200:
            return time.time()
        if resp is not None and resp.status_code != 404:  # 404: not served yet
            raise RuntimeError(f"{model}: HTTP {resp.status_code} {resp.text[:300]}")
        time.sleep(0.003)
    raise TimeoutError(f"{model} never answered")


def greedy(client: httpx.Client, model: str, ids: list[int], n: int = 12) -> list[int]:
    resp = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": n, "temperature": 0.0,
                                                "return_token_ids": True})
    resp.raise_for_status()
    return resp.json()["choices"][0]["token_ids"]


def bench_hot_swap(base: Path, work: Path, readies: list[AdapterReady], ids: list[int], warmup: int):
    """Swap every version in through the real generator service.

    Returns (latencies s, the same request repeated on the served version s, greedy answers per version).
    """
    from prometheus_client import REGISTRY

    from generator.service import run as run_generator

    store = work / "store"
    answers: dict[int, list[int]] = {}
    with EmbeddedBroker(log_file=work / "tansu.log") as broker:
        ensure_topics(broker.bootstrap)
        server = VllmServer(base, GeneratorSettings(vllm_port=0), log_file=work / "vllm-lora.log").start()
        stop = threading.Event()
        common = CommonSettings(bootstrap_servers=broker.bootstrap, store_dir=store, cache_dir=work, base_model=base)
        gen = threading.Thread(target=run_generator, name="generator",
                               args=(common, GeneratorSettings(vllm_url=server.url), stop))
        gen.start()
        producer = make_producer(broker.bootstrap)
        client = httpx.Client(base_url=server.url, timeout=120)
        latencies, repeats = [], []
        try:
            first_completion(client, "base", ids)  # the generator has registered `base` and is watching
            for k, ready in enumerate(readies):
                ready = ready.model_copy(update={"created_at": time.time()})
                publish(producer, topic_name(TOPIC_ADAPTERS), f"policy-v{ready.version}", ready)
                latency = first_completion(client, f"policy-v{ready.version}", ids) - ready.created_at
                t_warm = time.time()  # the same request again: what a served version's answer costs anyway
                first_completion(client, f"policy-v{ready.version}", ids)
                warm = time.time() - t_warm
                answers[ready.version] = greedy(client, f"policy-v{ready.version}", ids)
                tag = "warm-up" if k < warmup else "swap"
                print(f"  {tag} v{ready.version}: {latency * 1000:.0f} ms from AdapterReady to first completion "
                      f"(the same request again: {warm * 1000:.0f} ms)")
                if k >= warmup:
                    latencies.append(latency)
                    repeats.append(warm)
            own = (REGISTRY.get_sample_value("odpo_generator_swap_latency_seconds_sum") or 0) / max(
                1, REGISTRY.get_sample_value("odpo_generator_swap_latency_seconds_count") or 0)
            print(f"  the generator's own histogram (event -> loaded): mean {own * 1000:.0f} ms; the same "
                  f"1-token request on a version already served: median {summary(repeats)['p50'] * 1000:.0f} ms")
        finally:
            stop.set()
            gen.join(timeout=120)
            client.close()
            producer.close()
            server.stop()
    return latencies, repeats, answers


def merge(base: Path, adapter: Path, out: Path, tokenizer) -> None:
    """What a full-weight stack does with a new LoRA: fold it into the weights and save a servable model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bench_restart(base: Path, work: Path, readies: list[AdapterReady], ids: list[int], tokenizer):
    """Merge, stop the server, start one on the merged folder; returns (latencies s, phases, greedy answers).

    The merged model always lives at the same path, as a deployment's model volume would.
    """
    settings = GeneratorSettings(vllm_port=0, startup_timeout_s=900)
    live, staged = work / "merged", work / "merged.next"
    shutil.copytree(base, live)
    server = FullWeightServer(live, settings, log_file=work / "vllm-full-0.log").start()
    latencies, phases, answers = [], [], {}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            first_completion(client, SERVED_NAME, ids)  # the old weights were serving
        for ready in readies:
            t0 = time.time()
            merge(base, work / "store" / ready.path, staged, tokenizer)
            t_merged = time.time()
            server.stop()
            shutil.rmtree(live)
            staged.rename(live)
            t_stopped = time.time()
            server = FullWeightServer(live, settings, log_file=work / f"vllm-full-{ready.version}.log").start()
            t_healthy = time.time()
            with httpx.Client(base_url=server.url, timeout=120) as client:
                t_first = first_completion(client, SERVED_NAME, ids)
                answers[ready.version] = greedy(client, SERVED_NAME, ids)
            latencies.append(t_first - t0)
            phases.append({"merge_save_s": t_merged - t0, "stop_s": t_stopped - t_merged,
                           "start_s": t_healthy - t_stopped, "first_completion_s": t_first - t_healthy})
            print(f"  restart v{ready.version}: {t_first - t0:.1f} s (merge+save {t_merged - t0:.1f}, stop "
                  f"{t_stopped - t_merged:.1f}, start {t_healthy - t_stopped:.1f}, first {t_first - t_healthy:.2f})")
    finally:
        server.stop()
    return latencies, phases, answers


def bench_reload(base: Path, work: Path, readies: list[AdapterReady], ids: list[int], tokenizer):
    """Merge, then reload the running server's weights in place; returns (latencies s, phases, answers)."""
    server = FullWeightServer(base, GeneratorSettings(vllm_port=0, startup_timeout_s=900),
                              log_file=work / "vllm-reload.log").start()
    latencies, phases, answers = [], [], {}
    client = httpx.Client(base_url=server.url, timeout=600)
    try:
        first_completion(client, SERVED_NAME, ids)
        for ready in readies:
            t0 = time.time()
            folder = work / f"merged-v{ready.version}"
            merge(base, work / "store" / ready.path, folder, tokenizer)
            t_merged = time.time()
            resp = client.post("/collective_rpc", json={"method": "reload_weights",
                                                        "kwargs": {"weights_path": str(folder)}})
            resp.raise_for_status()
            client.post("/reset_prefix_cache").raise_for_status()  # cached blocks hold the old weights' KV
            t_reloaded = time.time()
            t_first = first_completion(client, SERVED_NAME, ids)
            answers[ready.version] = greedy(client, SERVED_NAME, ids)
            shutil.rmtree(folder, ignore_errors=True)
            latencies.append(t_first - t0)
            phases.append({"merge_save_s": t_merged - t0, "reload_s": t_reloaded - t_merged,
                           "first_completion_s": t_first - t_reloaded})
            print(f"  reload v{ready.version}: {t_first - t0:.2f} s (merge+save {t_merged - t0:.2f}, reload "
                  f"{t_reloaded - t_merged:.2f}, first {t_first - t_reloaded:.2f})")
    finally:
        client.close()
        server.stop()
    return latencies, phases, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--swaps", type=int, default=12, help="timed hot swaps (after --warmup untimed ones)")
    ap.add_argument("--warmup", type=int, default=2, help="hot swaps before timing starts")
    ap.add_argument("--restarts", type=int, default=3, help="merge + server restart repetitions (0 = skip)")
    ap.add_argument("--reloads", type=int, default=5, help="merge + in-place weight reload repetitions (0 = skip)")
    ap.add_argument("--compile", action="store_true",
                    help="let the full-weight server torch.compile at start (vLLM's default without LoRA)")
    ap.add_argument("--out", "--json", dest="out", type=Path, default=None,
                    help="also write the results here as JSON (--json: its old name)")
    args = ap.parse_args()
    if args.swaps < 10:
        ap.error("--swaps must be at least 10")
    FullWeightServer.compile = args.compile
    quiet_logs()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # vLLM computes on the other core
    base = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = chat_prompt_ids(tokenizer, 1)[0]
    with tempfile.TemporaryDirectory(prefix="odpo-hotswap-") as tmp:
        work = Path(tmp)
        n = args.warmup + args.swaps
        print(f"writing {n} adapters (r=8, q/k/v/o) into {work / 'store'}")
        readies = write_adapters(peft_model(base), base, work / "store", list(range(1, n + 1)))
        print(f"hot swap through the generator service: {args.warmup} warm-up + {args.swaps} timed swaps")
        swap_s, repeat_s, swap_answers = bench_hot_swap(base, work, readies, ids, args.warmup)
        result = {"hot_swap_s": summary(swap_s), "served_version_same_request_s": summary(repeat_s),
                  "prompt_tokens": len(ids), "full_weight_compile": args.compile}
        full = {}
        if args.restarts:
            print(f"full weights, merge + restart: {args.restarts} repetitions")
            lat, phases, answers = bench_restart(base, work, readies[-args.restarts:], ids, tokenizer)
            full["restart"] = (lat, answers)
            result["merge_restart_s"] = {**summary(lat), "phases": phases}
        if args.reloads:
            print(f"full weights, merge + in-place reload: {args.reloads} repetitions")
            lat, phases, answers = bench_reload(base, work, readies[-args.reloads:], ids, tokenizer)
            full["reload"] = (lat, answers)
            result["merge_reload_s"] = {**summary(lat), "phases": phases}

    hs = result["hot_swap_s"]
    print(f"\nhot swap (new LoRA name, no restart), {hs['n']} swaps: p50 {hs['p50'] * 1000:.0f} ms, "
          f"p95 {hs['p95'] * 1000:.0f} ms")
    for kind, (lat, answers) in full.items():
        s = summary(lat)
        same = sum(answers[v] == swap_answers[v] for v in answers)
        result[f"merge_{kind}_same_greedy_answer"] = f"{same}/{len(answers)}"
        result[f"ratio_merge_{kind}_p50"] = s["p50"] / hs["p50"]
        print(f"full weights, merge + {kind}, {s['n']} reps: p50 {s['p50']:.2f} s, p95 {s['p95']:.2f} s  "
              f"-> {s['p50'] / hs['p50']:.0f}x the hot swap's p50 (same greedy answer as the LoRA version: "
              f"{same}/{len(answers)})")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

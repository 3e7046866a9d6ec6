"""Gateway overhead: non-streamed completions through the gateway vs straight to vLLM, side by side.

One vLLM server (the zero adapter registered as `base`) and the gateway as
its own `odpo gateway` process in front of it, as in production (with the
broker: it reads the control topic and keeps its Kafka outbox), but no
`odpo gate`: the gate is not on the request path (it only scores versions
and publishes its decisions on odpo.control), and without one nothing else
sends requests to the engine while we measure, so the difference is the
gateway's own. With no decision on the topic, the gateway routes `policy`
to `base`; we start once its /readyz answers 200 with `policy_version` 0.
Each round sends the same greedy completion once directly (model `base`)
and once through the gateway (model `policy`, which resolves to `base`),
alternating which goes first; the overhead is the per-round difference.
Prints p50/p95 of both sides, of the difference, and the ratio.

With `--keys` a second gateway runs beside the first, with client API keys on
(ODPO_GATEWAY_API_KEYS_FILE: a generated file of `--key-count` keys, the one
used with a rate limit and a daily quota far above what the run sends, so the
limits are checked on every request but never refuse one). Each round then
sends the request three times, directly, through the keyless gateway and
through the keyed one (`Authorization: Bearer`), rotating the order; it
prints both gateways' overhead and the difference keys make.

    flock /tmp/odpo-vllm.lock python -m benchmarks.gateway_overhead [--rounds 300] [--max-tokens 1] [--keys]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import model_dir, quiet_logs, summary, write_json
from generator.server import VllmServer
from generator.zero_adapter import ZERO_ADAPTER_DIR, write_zero_adapter
from core.broker import EmbeddedBroker, free_port
from core.bus import ensure_topics
from service.launcher import Launcher
from core.settings import GeneratorSettings

PROMPT = "The capital of France is"


def timed(client: httpx.Client, model: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    resp = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                "temperature": 0.0})  # a keyed client carries its header
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    return elapsed


def write_keys(path: Path, count: int) -> str:
    """A keys file of `count` keys (hashes only, like a real Secret); returns the key the benchmark uses."""
    used = secrets.token_urlsafe(32)
    entries = [{"id": "bench", "sha256": hashlib.sha256(used.encode()).hexdigest(),
                "scopes": ["inference", "feedback", "prompts"], "rate_per_s": 1e6, "burst": 1e6,
                "daily_quota": 10**9}]
    entries += [{"id": f"other-{i}", "sha256": hashlib.sha256(secrets.token_bytes(32)).hexdigest(),
                 "scopes": ["inference"]} for i in range(count - 1)]
    path.write_text(json.dumps(entries))
    return used


def wait_ready_on_base(url: str, launcher: Launcher, timeout_s: float = 600) -> None:
    """Until the gateway answers /readyz with 200 and routes `policy` to `base` (version 0)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        launcher.check()
        try:
            resp = httpx.get(f"{url}/readyz", timeout=5)
            if resp.status_code == 200 and resp.json().get("policy_version") == 0:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError("the gateway was never ready with `policy` on base")


def measure(direct: httpx.Client, gateway: httpx.Client, rounds: int, max_tokens: int,
            concurrency: int) -> dict[str, list[float]]:
    """`rounds` pairs; with concurrency > 1, that many pairs run at once (each pair still back to back)."""
    def pair(i: int) -> tuple[float, float]:
        if i % 2:
            d = timed(direct, "base", max_tokens)
            g = timed(gateway, "policy", max_tokens)
        else:
            g = timed(gateway, "policy", max_tokens)
            d = timed(direct, "base", max_tokens)
        return d, g

    for i in range(10):  # warm-up: connections, the engine's first requests
        pair(i)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(pair, range(rounds)))
    return {"direct": [d for d, _ in results], "gateway": [g for _, g in results],
            "overhead": [g - d for d, g in results]}


def measure_keys(direct: httpx.Client, plain: httpx.Client, keyed: httpx.Client, rounds: int, max_tokens: int,
                 concurrency: int) -> dict[str, list[float]]:
    """`rounds` triples (direct, keyless gateway, keyed gateway), the order rotated each round."""
    sides = [(direct, "base"), (plain, "policy"), (keyed, "policy")]

    def triple(i: int) -> tuple[float, float, float]:
        times = [0.0, 0.0, 0.0]
        for k in range(3):
            j = (i + k) % 3
            times[j] = timed(sides[j][0], sides[j][1], max_tokens)
        return times[0], times[1], times[2]

    for i in range(10):
        triple(i)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(triple, range(rounds)))
    return {"direct": [d for d, _, _ in results], "gateway": [g for _, g, _ in results],
            "gateway_keys": [k for _, _, k in results], "overhead": [g - d for d, g, _ in results],
            "overhead_keys": [k - d for d, _, k in results], "keys_cost": [k - g for _, g, k in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--keys", action="store_true", help="Also a gateway with client API keys on, side by side.")
    ap.add_argument("--key-count", type=int, default=100, help="Keys in the generated keys file (with --keys).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the numbers as JSON here.")
    args = ap.parse_args()
    quiet_logs()
    base_dir = model_dir()
    with tempfile.TemporaryDirectory(prefix="odpo-bench-gw-") as tmp, EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap)
        store = Path(tmp) / "store"
        server = VllmServer(base_dir, GeneratorSettings(vllm_port=0), log_file=Path(tmp) / "vllm.log").start()
        launcher = None
        try:
            zero = write_zero_adapter(base_dir, store / ZERO_ADAPTER_DIR)
            httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": str(zero)},
                       timeout=60).raise_for_status()
            port = free_port()
            launcher = Launcher(Path(tmp) / "logs", {
                "ODPO_BOOTSTRAP_SERVERS": broker.bootstrap, "ODPO_STORE_DIR": str(store),
                "ODPO_GATEWAY_PORT": str(port), "ODPO_GATEWAY_VLLM_URL": server.url, "ODPO_LOG_LEVEL": "WARNING"})
            launcher.start("gateway")
            url = f"http://127.0.0.1:{port}"
            keyed_url, key = None, None
            if args.keys:
                key = write_keys(Path(tmp) / "keys.json", args.key_count)
                keyed_port = free_port()
                launcher.start("gateway", {"ODPO_GATEWAY_PORT": str(keyed_port),
                                           "ODPO_GATEWAY_API_KEYS_FILE": str(Path(tmp) / "keys.json")},
                               name="gateway-keys")
                keyed_url = f"http://127.0.0.1:{keyed_port}"
            wait_ready_on_base(url, launcher)
            if keyed_url:
                wait_ready_on_base(keyed_url, launcher)
            limits = httpx.Limits(max_keepalive_connections=args.concurrency + 2)
            with httpx.Client(base_url=server.url, timeout=120, limits=limits) as direct, \
                    httpx.Client(base_url=url, timeout=120, limits=limits) as gateway:
                if keyed_url:
                    with httpx.Client(base_url=keyed_url, timeout=120, limits=limits,
                                      headers={"authorization": f"Bearer {key}"}) as keyed:
                        samples = measure_keys(direct, gateway, keyed, args.rounds, args.max_tokens,
                                               args.concurrency)
                else:
                    samples = measure(direct, gateway, args.rounds, args.max_tokens, args.concurrency)
        finally:
            if launcher:
                launcher.stop()
            server.stop()
    result = {k: summary(v) for k, v in samples.items()}
    result["config"] = vars(args) | {"out": str(args.out) if args.out else None}
    ms = lambda x: f"{x * 1000:7.2f} ms"
    print(f"non-streamed completions, max_tokens={args.max_tokens}, {args.rounds} rounds, "
          f"concurrency {args.concurrency}")
    for k in [k for k in samples if k != "config"]:
        print(f"  {k:13s} p50 {ms(result[k]['p50'])}  p95 {ms(result[k]['p95'])}  mean {ms(result[k]['mean'])}")
    for k in [k for k in ("gateway", "gateway_keys") if k in samples]:
        print(f"  ratio {k}/direct: p50 {result[k]['p50'] / result['direct']['p50']:.3f}  "
              f"p95 {result[k]['p95'] / result['direct']['p95']:.3f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()

"""Two generators, each with its own vLLM, behind one gateway: how long from a version's publication until
every replica serves it, and whether any client request fails meanwhile.

    python -m benchmarks.serving_replicas --versions 10 --interval-s 30 --out runs/replicas

Real parts: the Tansu broker, two `odpo generator` processes (each starts its vLLM with the adapter store's
LoRA resolver), one `odpo gateway` routing to both, with its promotion gate (few held-out prompts, limits
wide open: this run measures serving, not learning). Versions are published as the trainer publishes them
(the folder renamed into the store, the announcement, then AdapterReady on odpo.adapters), with random
LoRA weights instead of a training run, so the publication times are ours to measure from.

Per version: publish -> answered by each engine (a direct request for `policy-v<N>` to each vLLM, every
0.25 s; the resolver loads it on first request if its generator has not loaded it yet), and publish ->
`policy` = v<N> at the gateway (the gate loaded it into every engine, scored and promoted it). Two clients call the gateway the whole time, one for `policy`, one
for the newest published `policy-v<N>`; every answer is checked (status, served version, which engine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import ClientLoops, model_dir, peft_model, summary, write_adapters, write_json
from core.adapter_store import write_manifest
from core.broker import EmbeddedBroker, free_port
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, version_name

GATE_ENV = {"ODPO_GATEWAY_HELDOUT_PROMPTS": "4", "ODPO_GATEWAY_HELDOUT_PROMPTS_MAX": "4",
            "ODPO_GATEWAY_EVAL_MAX_TOKENS": "12", "ODPO_GATEWAY_PROMOTION_TOLERANCE": "1",
            "ODPO_GATEWAY_GATE_REFERENCE_LOGPROB": "false", "ODPO_GATEWAY_LIMIT_REF_LOGPROB": "100",
            **{f"ODPO_GATEWAY_LIMIT_{s}": "1" for s in ("MEAN_WORDS", "EMPTY_SHARE", "DISTINCT2", "ON_TOPIC_SHARE",
                                                      "GUARD_PASS")}}
MESSAGES = [{"role": "user", "content": "Say something about rivers."}]


def _served(url: str, model: str, max_tokens: int = 1) -> httpx.Response | None:
    try:
        return httpx.post(f"{url}/v1/chat/completions", timeout=120,
                          json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0})
    except httpx.HTTPError:
        return None


def _listed(url: str) -> set[str]:
    try:
        return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return set()


def _wait(cond, timeout_s: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"a process died while waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.5)


class Clients(ClientLoops):
    """Two gateway clients: one asks `policy`, one the newest published `policy-v<N>`; every answer checked
    (results keyed by kind, engine, "ok" | error)."""

    kinds = ("policy", "version")

    def _loop(self, kind: str) -> None:
        while not self._halt.is_set():
            version = self.newest
            model = "policy" if kind == "policy" or version == 0 else f"policy-v{version}"
            resp = _served(self.gateway, model, max_tokens=8)
            if resp is None:
                self.results[(kind, "-", "connection error")] += 1
                continue
            engine = resp.headers.get("x-odpo-engine", "-")
            ok = resp.status_code == 200 and (model == "policy" or resp.json().get("model") == model)
            self.results[(kind, f"engine {engine}", "ok" if ok else f"HTTP {resp.status_code}")] += 1
            self._halt.wait(0.2)


def run(versions: int, interval_s: float, out: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="odpo-replicas-"))
    store = work / "store"
    procs: list[subprocess.Popen] = []
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        ensure_topics(broker.bootstrap)
        env = {**os.environ, "ODPO_BOOTSTRAP_SERVERS": broker.bootstrap, "ODPO_STORE_DIR": str(store),
               "HF_HUB_OFFLINE": "1", **GATE_ENV}
        engines = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        gateway = f"http://127.0.0.1:{free_port()}"
        try:
            for i, url in enumerate(engines):
                procs.append(_spawn("generator", work / f"generator-{i}.log", {
                    **env, "ODPO_GENERATOR_VLLM_PORT": url.rsplit(":", 1)[1],
                    "ODPO_GENERATOR_LOG_FILE": str(work / f"vllm-{i}.log")}))
            _wait(lambda: all("base" in _listed(u) for u in engines), 900, "both vLLMs serving base", procs)
            procs.append(_spawn("gateway", work / "gateway.log", {
                **env, "ODPO_GATEWAY_VLLM_URL": ",".join(engines), "ODPO_GATEWAY_PORT": gateway.rsplit(":", 1)[1]}))
            _wait(lambda: _ready(gateway), 300, "the gateway ready", procs)
            result = _publish_and_measure(gateway, engines, store, broker.bootstrap, versions, interval_s, procs)
        finally:
            _stop(procs)
    result["work_dir"] = str(work)
    write_json(out / "serving_replicas.json" if out else None, result)
    return result


def _publish_and_measure(gateway: str, engines: list[str], store: Path, bootstrap: str, versions: int,
                         interval_s: float, procs: list) -> dict:
    import torch

    torch.set_num_threads(1)
    model = peft_model(model_dir())
    producer = make_producer(bootstrap)
    clients = Clients(gateway).start()
    rows = []
    try:
        for v in range(1, versions + 1):
            ready = write_adapters(model, model_dir(), store, [v])[0]
            write_manifest(store, ready)  # the trainer's order: folder, announcement, then the topic
            publish(producer, TOPIC_ADAPTERS, version_name(v), ready)
            published = time.monotonic()
            clients.newest = v
            row = {"version": v, "answered_s": [None] * len(engines), "policy_s": None}
            name = f"policy-v{v}"
            since = lambda: round(time.monotonic() - published, 3)  # noqa: E731
            while since() < max(interval_s, 5) or row["policy_s"] is None:
                for i, url in enumerate(engines):
                    if row["answered_s"][i] is None:
                        resp = _served(url, name)
                        if resp is not None and resp.status_code == 200:
                            row["answered_s"][i] = since()
                if row["policy_s"] is None and _promoted(gateway) == v:
                    row["policy_s"] = since()
                if since() > interval_s + 300:
                    break
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a component died during the run")
                time.sleep(0.25)
            row["served_by_all_s"] = max(row["answered_s"]) if None not in row["answered_s"] else None
            rows.append(row)
            print(f"v{v}: served by both {row['served_by_all_s']}s, policy {row['policy_s']}s", flush=True)
    finally:
        results = clients.stop()
        producer.close()
    done = [r["served_by_all_s"] for r in rows if r["served_by_all_s"] is not None]
    policy = [r["policy_s"] for r in rows if r["policy_s"] is not None]
    failed = {k: n for k, n in results.items() if not k.endswith("/ok")}
    return {"versions": rows, "served_by_all": summary(done) if done else None,
            "policy_moved": summary(policy) if policy else None, "client_results": results,
            "client_failures": sum(failed.values()), "versions_served_by_all": len(done)}


def _promoted(gateway: str) -> int | None:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=5).json().get("policy_version")
    except (httpx.HTTPError, ValueError):
        return None


def _ready(gateway: str) -> bool:
    try:
        return httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the components (a minute to stop, then killed)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def _spawn(component: str, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", component], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", type=int, default=10)
    ap.add_argument("--interval-s", type=float, default=30.0, help="Time between publications.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    r = run(args.versions, args.interval_s, args.out)
    print(f"publish -> served by both replicas: {r['served_by_all']}")
    print(f"publish -> `policy` moved (gate scored, loaded everywhere, promoted): {r['policy_moved']}")
    print(f"client answers: {r['client_results']} ({r['client_failures']} failed)")
    return 0 if r["client_failures"] == 0 and r["versions_served_by_all"] == args.versions else 1


if __name__ == "__main__":
    sys.exit(main())

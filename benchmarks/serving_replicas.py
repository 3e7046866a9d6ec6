"""Two generators, each with its own vLLM, behind two gateway replicas and the promotion gate: how long from
a version's publication until every engine serves it, until the gate promotes it and until every gateway
routes `policy` to it, and whether any client request fails meanwhile.

    python -m benchmarks.serving_replicas --versions 10 --interval-s 30 [--gateways 2] --out runs/replicas

Real parts: the Tansu broker, two `odpo generator` processes (each starts its vLLM with the adapter store's
LoRA resolver), `--gateways` `odpo gateway` replicas routing to both engines, and one `odpo gate` scoring
on the same two engines (few held-out prompts, limits wide open: this run measures serving, not learning).
The gate publishes its decisions on odpo.control; every gateway reads them there. Versions are published
as the trainer publishes them (the folder renamed into the store, the announcement, then AdapterReady on
odpo.adapters), with random LoRA weights instead of a training run, so the publication times are ours to
measure from.

Per version: publish -> answered by each engine (a direct request for `policy-v<N>` to each vLLM, every
0.25 s; the resolver loads it on first request if its generator has not loaded it yet); publish -> the
gate promoted it (its /readyz `promoted`: it loaded the version into every engine, scored and promoted
it); publish -> `policy` = v<N> at each gateway (its /readyz `policy_version`: the decision read from the
control topic). Two clients call the gateways the whole time, one for `policy`, one for the newest
published `policy-v<N>` (with two gateways, one client on each); every answer is checked (status, served
version, which engine).
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

from benchmarks.common import OPEN_GATE_ENV, ClientLoops, model_dir, peft_model, summary, write_adapters, write_json
from core.adapter_store import write_manifest
from core.broker import EmbeddedBroker, free_port
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, version_name
from core.topics import topic_name

# The gate's settings (ODPO_GATE_*): 4 held-out prompts of 12 tokens, any version promoted.
GATE_ENV = {"ODPO_GATE_HELDOUT_PROMPTS": "4", "ODPO_GATE_HELDOUT_PROMPTS_MAX": "4",
            "ODPO_GATE_EVAL_MAX_TOKENS": "12", **OPEN_GATE_ENV}
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
    """Two gateway clients: one asks `policy`, one the newest published `policy-v<N>`, the first on the first
    gateway, the second on the next one (or the same where there is one); every answer checked (results keyed
    by kind, gateway, engine, "ok" | error)."""

    kinds = ("policy", "version")

    def __init__(self, gateways: list[str]):
        super().__init__(gateways[0])
        self.gateways = gateways

    def _loop(self, kind: str) -> None:
        g = self.kinds.index(kind) % len(self.gateways)
        while not self._halt.is_set():
            version = self.newest
            model = "policy" if kind == "policy" or version == 0 else f"policy-v{version}"
            resp = _served(self.gateways[g], model, max_tokens=8)
            if resp is None:
                self.results[(kind, f"gateway {g}", "-", "connection error")] += 1
                continue
            engine = resp.headers.get("x-odpo-engine", "-")
            ok = resp.status_code == 200 and (model == "policy" or resp.json().get("model") == model)
            self.results[(kind, f"gateway {g}", f"engine {engine}", "ok" if ok else f"HTTP {resp.status_code}")] += 1
            self._halt.wait(0.2)


def start_gate(work: Path, env: dict, engines: list[str], token: str | None = None) -> tuple[str, subprocess.Popen]:
    """`odpo gate` scoring on `engines` (its settings from `env`: ODPO_GATE_*), on a free port; its URL and
    process. `token`: its admin API's bearer token (None: no admin API)."""
    url = f"http://127.0.0.1:{free_port()}"
    gate_env = {**env, "ODPO_GATE_VLLM_URL": ",".join(engines), "ODPO_GATE_PORT": url.rsplit(":", 1)[1]}
    if token is not None:
        gate_env["ODPO_GATE_ADMIN_TOKEN"] = token
    return url, _spawn("gate", work / "gate.log", gate_env)


def start_gateway(work: Path, env: dict, engines: list[str], name: str = "gateway") -> tuple[str, subprocess.Popen]:
    """An `odpo gateway` replica routing to `engines` on a free port (it reads the gate's decisions from
    odpo.control); its URL and process."""
    url = f"http://127.0.0.1:{free_port()}"
    return url, _spawn("gateway", work / f"{name}.log", {
        **env, "ODPO_GATEWAY_VLLM_URL": ",".join(engines), "ODPO_GATEWAY_PORT": url.rsplit(":", 1)[1]})


def run(versions: int, interval_s: float, out: Path | None, gateways: int = 2) -> dict:
    work = Path(tempfile.mkdtemp(prefix="odpo-replicas-"))
    store = work / "store"
    procs: list[subprocess.Popen] = []
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        ensure_topics(broker.bootstrap)
        env = {**os.environ, "ODPO_BOOTSTRAP_SERVERS": broker.bootstrap, "ODPO_STORE_DIR": str(store),
               "HF_HUB_OFFLINE": "1", **GATE_ENV}
        engines = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        try:
            for i, url in enumerate(engines):
                procs.append(_spawn("generator", work / f"generator-{i}.log", {
                    **env, "ODPO_GENERATOR_VLLM_PORT": url.rsplit(":", 1)[1],
                    "ODPO_GENERATOR_LOG_FILE": str(work / f"vllm-{i}.log")}))
            _wait(lambda: all("base" in _listed(u) for u in engines), 900, "both vLLMs serving base", procs)
            gate, proc = start_gate(work, env, engines)
            procs.append(proc)
            urls = []
            for i in range(gateways):
                url, proc = start_gateway(work, env, engines, f"gateway-{i}")
                urls.append(url)
                procs.append(proc)
            _wait(lambda: _ready(gate), 300, "the gate ready (writing the registry)", procs)
            _wait(lambda: all(_ready(u) for u in urls), 300, "every gateway ready", procs)
            result = _publish_and_measure(gate, urls, engines, store, broker.bootstrap, versions, interval_s, procs)
        finally:
            _stop(procs)
    result["work_dir"] = str(work)
    write_json(out / "serving_replicas.json" if out else None, result)
    return result


def _publish_and_measure(gate: str, gateways: list[str], engines: list[str], store: Path, bootstrap: str,
                         versions: int, interval_s: float, procs: list) -> dict:
    import torch

    torch.set_num_threads(1)
    model = peft_model(model_dir())
    producer = make_producer(bootstrap)
    clients = Clients(gateways).start()
    rows = []
    try:
        for v in range(1, versions + 1):
            ready = write_adapters(model, model_dir(), store, [v])[0]
            write_manifest(store, ready)  # the trainer's order: folder, announcement, then the topic
            publish(producer, topic_name(TOPIC_ADAPTERS), version_name(v), ready)
            published = time.monotonic()
            clients.newest = v
            row = {"version": v, "answered_s": [None] * len(engines), "promoted_s": None,
                   "policy_at_s": [None] * len(gateways)}
            name = f"policy-v{v}"
            since = lambda: round(time.monotonic() - published, 3)  # noqa: E731
            while since() < max(interval_s, 5) or None in row["policy_at_s"]:
                for i, url in enumerate(engines):
                    if row["answered_s"][i] is None:
                        resp = _served(url, name)
                        if resp is not None and resp.status_code == 200:
                            row["answered_s"][i] = since()
                if row["promoted_s"] is None and _gate_promoted(gate) == v:
                    row["promoted_s"] = since()
                for i, url in enumerate(gateways):
                    if row["policy_at_s"][i] is None and _promoted(url) == v:
                        row["policy_at_s"][i] = since()
                if since() > interval_s + 300:
                    break
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a component died during the run")
                time.sleep(0.25)
            row["served_by_all_s"] = max(row["answered_s"]) if None not in row["answered_s"] else None
            row["policy_s"] = max(row["policy_at_s"]) if None not in row["policy_at_s"] else None
            rows.append(row)
            print(f"v{v}: served by both engines {row['served_by_all_s']}s, promoted by the gate "
                  f"{row['promoted_s']}s, `policy` at every gateway {row['policy_s']}s", flush=True)
    finally:
        results = clients.stop()
        producer.close()
    done = [r["served_by_all_s"] for r in rows if r["served_by_all_s"] is not None]
    promoted = [r["promoted_s"] for r in rows if r["promoted_s"] is not None]
    policy = [r["policy_s"] for r in rows if r["policy_s"] is not None]
    # gate decision -> read by the slowest gateway (control topic); only where the 0.25 s probes saw both apart
    lag = [r["policy_s"] - r["promoted_s"] for r in rows if r["policy_s"] is not None and r["promoted_s"] is not None]
    failed = {k: n for k, n in results.items() if not k.endswith("/ok")}
    return {"gateways": len(gateways), "versions": rows, "served_by_all": summary(done) if done else None,
            "promoted": summary(promoted) if promoted else None,
            "policy_moved": summary(policy) if policy else None,
            "promoted_to_policy": summary(lag) if lag else None, "client_results": results,
            "client_failures": sum(failed.values()), "versions_served_by_all": len(done)}


def _gate_promoted(gate: str) -> int | None:
    """The version the gate has promoted (its /readyz), None while it does not answer or is not writing."""
    try:
        resp = httpx.get(f"{gate}/readyz", timeout=5)
        return resp.json().get("promoted") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


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
    ap.add_argument("--gateways", type=int, default=2, help="Gateway replicas (each reads the gate's decisions).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.gateways < 1:
        ap.error("--gateways must be at least 1")
    r = run(args.versions, args.interval_s, args.out, args.gateways)
    print(f"publish -> served by both engines: {r['served_by_all']}")
    print(f"publish -> promoted by the gate (loaded everywhere, scored, promoted): {r['promoted']}")
    print(f"publish -> `policy` moved at every gateway ({r['gateways']}): {r['policy_moved']}")
    print(f"gate's promotion -> `policy` at the slowest gateway (control topic): {r['promoted_to_policy']}")
    print(f"client answers: {r['client_results']} ({r['client_failures']} failed)")
    return 0 if r["client_failures"] == 0 and r["versions_served_by_all"] == args.versions else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak of adapter churn on one vLLM (issue 18): versions published every ~30 s, the gate scoring each,
clients on `policy`, the newest `policy-v<N>` and an older one at once, for half an hour or more.

    python -m benchmarks.adapter_soak --minutes 30 --interval-s 30 --out runs/soak

Real parts: the Tansu broker, `odpo generator` (its vLLM, the store's LoRA resolver, sampling a trickle of
bundled prompts, so its own requests mix with the others), `odpo gate` scoring on that vLLM (few held-out
prompts, limits wide open: this run measures serving, not learning) and `odpo gateway` in front of it,
routing `policy` as the gate decides (odpo.control). Versions are published as the trainer publishes them
(folder renamed into the store, announcement, AdapterReady on odpo.adapters), with random LoRA weights
instead of a training run, and after each publication the trainer's own retention
(`trainer.retention.prune_store`, keep 5 plus what the gate holds) deletes old versions, so the
generator's unloading of deleted names is exercised too.

Measured: engine crashes (the generator's `odpo_generator_engine_crashes_total`, and whether vLLM's pid
changed), every client answer (status, served model), every version's verdict at the end (the gate's admin
API, /admin/versions), and
vLLM's memory of adapters at the start and the end: the names it lists and the resident memory of its
processes (API server, engine core, worker). Exit code 0 only with no crash, no failed request and every
version decided.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.common import ClientLoops, model_dir, peft_model, write_adapters, write_json
from benchmarks.serving_replicas import GATE_ENV, _listed, _ready, _spawn, _stop, _wait, start_gate, start_gateway
from core.adapter_store import write_manifest
from core.broker import EmbeddedBroker, free_port
from core.bus import ensure_topics, make_producer, publish
from core.contracts import TOPIC_ADAPTERS, TOPIC_PROMPTS, version_name
from core.topics import topic_name
from service.task import make_prompts
from service.up_metrics import sample_value
from trainer.retention import prune_store

TOKEN = "soak-admin-token"
MESSAGES = [{"role": "user", "content": "Say something about rivers."}]
KEEP_VERSIONS = 5
OLDER_BY = 3  # the "older one" clients ask for: newest - 3, which retention keeps


def vllm_api_pid(port: int) -> int | None:
    """The pid of the vLLM API server listening on `port` (its command line names the port)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmd and str(port).encode() in cmd:
            return int(pid)
    return None


def vllm_rss_mib(api_pid: int | None) -> float | None:
    """Resident memory of every process in the vLLM API server's session (engine core and worker too)."""
    if api_pid is None:
        return None
    sid, total = os.getsid(api_pid), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != sid:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return round(total / 1024, 1)


def adapters_in_memory(engine: str, port: int) -> dict:
    names, pid = _listed(engine), vllm_api_pid(port)
    return {"policy_names_listed": sum(1 for n in names if n.startswith("policy-v")), "base_listed": "base" in names,
            "rss_mib": vllm_rss_mib(pid), "api_pid": pid}


class Clients(ClientLoops):
    """Three gateway clients at once: `policy`, the newest `policy-v<N>`, and `policy-v<newest - 3>` (results
    keyed by kind, "ok" | "failed"; the failures kept with what they got)."""

    kinds = ("policy", "newest", "older")

    def __init__(self, gateway: str):
        super().__init__(gateway)
        self.failures: list[str] = []

    def _model(self, kind: str) -> str:
        v = self.newest if kind == "newest" else self.newest - OLDER_BY
        return "policy" if kind == "policy" or v < 1 else version_name(v)

    def _loop(self, kind: str) -> None:
        with httpx.Client(base_url=self.gateway, timeout=300) as client:
            while not self._halt.is_set():
                model = self._model(kind)
                try:
                    resp = client.post("/v1/chat/completions", json={
                        "model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0})
                except httpx.HTTPError as exc:
                    self._record(kind, model, f"{type(exc).__name__}")
                    continue
                ok = resp.status_code == 200 and (model == "policy" or resp.json().get("model") == model)
                self._record(kind, model, "ok" if ok else f"HTTP {resp.status_code}: {resp.text[:200]}")
                self._halt.wait(0.3)

    def _record(self, kind: str, model: str, outcome: str) -> None:
        self.results[(kind, "ok" if outcome == "ok" else "failed")] += 1
        if outcome != "ok":
            self.failures.append(f"{time.strftime('%H:%M:%S')} {kind} {model}: {outcome}")
            print(f"!! client {kind} ({model}): {outcome}", flush=True)


def run(minutes: float, interval_s: float, out: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="odpo-soak-"))
    store = work / "store"
    procs: list[subprocess.Popen] = []
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        ensure_topics(broker.bootstrap)
        env = {**os.environ, "ODPO_BOOTSTRAP_SERVERS": broker.bootstrap, "ODPO_STORE_DIR": str(store),
               "HF_HUB_OFFLINE": "1", **GATE_ENV}
        vllm_port, metrics_port = free_port(), free_port()
        engine = f"http://127.0.0.1:{vllm_port}"
        try:
            procs.append(_spawn("generator", work / "generator.log", {
                **env, "ODPO_GENERATOR_VLLM_PORT": str(vllm_port), "ODPO_GENERATOR_METRICS_PORT": str(metrics_port),
                "ODPO_GENERATOR_MAX_TOKENS": "16", "ODPO_GENERATOR_N": "2",
                "ODPO_GENERATOR_LOG_FILE": str(work / "vllm.log")}))
            _wait(lambda: "base" in _listed(engine), 900, "vLLM serving base", procs)
            gate, proc = start_gate(work, env, [engine], token=TOKEN)
            procs.append(proc)
            gateway, proc = start_gateway(work, env, [engine])
            procs.append(proc)
            _wait(lambda: _ready(gate), 300, "the gate ready (writing the registry)", procs)
            _wait(lambda: _ready(gateway), 300, "the gateway ready", procs)
            result = _soak(gateway, gate, engine, vllm_port, f"http://127.0.0.1:{metrics_port}/metrics", store,
                           broker.bootstrap, minutes, interval_s, procs)
        finally:
            _stop(procs)
    result["work_dir"] = str(work)
    write_json(out / "adapter_soak.json" if out else None, result)
    return result


def _soak(gateway: str, gate: str, engine: str, vllm_port: int, gen_metrics: str, store: Path, bootstrap: str,
          minutes: float, interval_s: float, procs: list) -> dict:
    import torch

    torch.set_num_threads(1)
    model = peft_model(model_dir())
    producer = make_producer(bootstrap)
    prompts = make_prompts("train", 10_000)
    start = adapters_in_memory(engine, vllm_port)
    clients = Clients(gateway).start()
    t0, v, fed, next_publish = time.monotonic(), 0, 0, time.monotonic()
    deleted: list[int] = []
    series: list[dict] = []  # per publication: minute, versions vLLM lists, its resident memory
    try:
        while time.monotonic() - t0 < minutes * 60:
            if time.monotonic() >= next_publish:
                v += 1
                ready = write_adapters(model, model_dir(), store, [v])[0]
                write_manifest(store, ready)  # the trainer's order: folder, announcement, then the topic
                publish(producer, topic_name(TOPIC_ADAPTERS), version_name(v), ready)
                deleted += prune_store(store, KEEP_VERSIONS)
                clients.newest = v
                next_publish += interval_s
                mem = adapters_in_memory(engine, vllm_port)
                series.append({"minute": round((time.monotonic() - t0) / 60, 2), "version": v,
                               "listed": mem["policy_names_listed"], "rss_mib": mem["rss_mib"]})
                print(f"{(time.monotonic() - t0) / 60:5.1f} min: published v{v}; vLLM lists "
                      f"{mem['policy_names_listed']} versions, RSS {mem['rss_mib']} MiB; "
                      f"clients {dict(clients.results)}", flush=True)
            publish(producer, topic_name(TOPIC_PROMPTS), prompts[fed % len(prompts)].id, prompts[fed % len(prompts)])
            fed += 1
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a component exited during the soak")
            time.sleep(3)
        verdicts = _wait_decided(gate, v, timeout_s=180)
    finally:
        results = clients.stop()
        producer.close()
    end = adapters_in_memory(engine, vllm_port)
    metrics = httpx.get(gen_metrics, timeout=10).text
    crashes = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("odpo_generator_engine_crashes_total{"))
    statuses = Counter(r["status"] for r in verdicts)
    undecided = [r["version"] for r in verdicts if r["status"] in ("pending", "evaluating")]
    return {"minutes": minutes, "interval_s": interval_s, "versions_published": v, "retention_deleted": len(deleted),
            "prompts_fed": fed, "engine_crashes": crashes,
            "vllm_restarted": start["api_pid"] != end["api_pid"],
            "unloads": sample_value(metrics, "odpo_generator_unloads_total"),
            "client_results": results, "client_failures": sum(n for k, n in results.items() if k.endswith("failed")),
            "failures": clients.failures[:50], "verdicts": dict(statuses), "undecided": undecided,
            "failed_versions": [f"v{r['version']}: {r.get('reason')}" for r in verdicts if r["status"] == "failed"],
            "memory_start": start, "memory_end": end, "memory_series": series}


def _wait_decided(gate: str, newest: int, timeout_s: float) -> list[dict]:
    """The gate's record of every version (its admin API) once none is pending or being scored (or after
    `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        versions = httpx.get(f"{gate}/admin/versions", timeout=30,
                             headers={"authorization": f"Bearer {TOKEN}"}).json()["versions"]
        waiting = [r for r in versions if r["status"] in ("pending", "evaluating")]
        if (not waiting and max(r["version"] for r in versions) >= newest) or time.monotonic() > deadline:
            return versions
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval-s", type=float, default=30.0, help="Time between publications.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    r = run(args.minutes, args.interval_s, args.out)
    print(f"{r['versions_published']} versions in {r['minutes']} min ({r['retention_deleted']} deleted by retention, "
          f"{r['unloads']} names unloaded); engine crashes {r['engine_crashes']:g} "
          f"(vLLM restarted: {r['vllm_restarted']})")
    print(f"client answers: {r['client_results']} ({r['client_failures']} failed)")
    print(f"verdicts: {r['verdicts']}; undecided: {r['undecided']}; failed: {r['failed_versions']}")
    for when in ("start", "end"):
        m = r[f"memory_{when}"]
        print(f"vLLM at the {when}: {m['policy_names_listed']} policy versions listed, RSS {m['rss_mib']} MiB")
    ok = r["engine_crashes"] == 0 and not r["vllm_restarted"] and r["client_failures"] == 0 and not r["undecided"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

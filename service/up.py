"""`odpo up`: the whole loop on one machine.

Starts the embedded broker, prepares the packaged model, starts every
component as its own `odpo <component>` process, scores the held-out prompts
on `base`, feeds the bundled train prompts, shows live progress, and with
`--rounds N` stops after version N, scores the held-out prompts again on
`policy` and prints a summary. Ctrl-C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from service.assets import base_model_dir
from service.broker import EmbeddedBroker, free_port
from service.bus import ensure_topics, make_producer
from service.launcher import ComponentDied, Launcher
from service.loop_watch import LoopCounts, LoopWatcher
from service.prompt_feed import PromptFeeder
from service.settings import CommonSettings, GeneratorSettings

COMPONENTS = ("judge", "trainer", "generator", "gateway")


@dataclass
class UpOptions:
    rounds: int | None
    port: int
    run_dir: Path | None
    train_prompts: int
    heldout_prompts: int
    window_pairs: int | None
    ready_timeout_s: float = 900


def run_up(opts: UpOptions) -> int:
    from judge.heldout import evaluate_heldout
    from service.task import make_prompts

    console = Console()
    common, gen = CommonSettings(), GeneratorSettings()
    run_dir = (opts.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM shuts down as cleanly as Ctrl-C
    started = time.monotonic()
    broker = launcher = watcher = None
    try:
        broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
        ensure_topics(broker.bootstrap)
        console.print(f"broker: Tansu on {broker.bootstrap}")
        with console.status("preparing the base model (converted once, then cached)"):
            model_dir = base_model_dir(common.cache_dir, common.base_model)
        console.print(f"base model: {model_dir}")
        gateway_url = f"http://127.0.0.1:{opts.port}"
        launcher = Launcher(run_dir / "logs", _child_env(broker.bootstrap, run_dir, opts, model_dir))
        for name in COMPONENTS:
            launcher.start(name)
        console.print(f"components started; logs in {run_dir / 'logs'}")
        _wait_ready(gateway_url, launcher, opts.ready_timeout_s, console)
        console.print(f"gateway: {gateway_url}/v1 (models `policy`, `base`, `policy-v<N>`)")

        heldout = make_prompts("heldout", opts.heldout_prompts)
        with console.status(f"scoring {len(heldout)} held-out prompts on `base`"):
            before = evaluate_heldout(gateway_url, "base", heldout, gen.max_tokens)
        console.print(f"held-out verifier score, base: {before.mean_score:.3f}")

        watcher = LoopWatcher(broker.bootstrap)
        watcher.start()
        producer = make_producer(broker.bootstrap)
        feeder = PromptFeeder(producer, make_prompts("train", opts.train_prompts), backlog=2 * gen.max_in_flight)
        counts = _follow(launcher, watcher, feeder, gateway_url, opts.rounds, started, console)
        feeder.close()

        with console.status(f"scoring {len(heldout)} held-out prompts on `policy`"):
            after = evaluate_heldout(gateway_url, "policy", heldout, gen.max_tokens)
        summary = _summary(counts, before, after, feeder.sent, time.monotonic() - started)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print(_summary_table(summary))
        console.print(f"summary written to {run_dir / 'summary.json'}")
        return 0
    except KeyboardInterrupt:
        console.print("stopping ...")
        return 130
    except ComponentDied as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        if watcher:
            watcher.stop()
        if launcher:
            launcher.stop()
        if broker:
            broker.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _child_env(bootstrap: str, run_dir: Path, opts: UpOptions, model_dir: Path) -> dict[str, str]:
    vllm_port = free_port()
    env = {
        "ODPO_BOOTSTRAP_SERVERS": bootstrap,
        "ODPO_STORE_DIR": str(run_dir / "store"),
        "ODPO_BASE_MODEL": str(model_dir),
        "ODPO_GENERATOR_VLLM_PORT": str(vllm_port),
        "ODPO_GATEWAY_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
        "ODPO_GENERATOR_LOG_FILE": str(run_dir / "logs" / "vllm.log"),
        "ODPO_GATEWAY_PORT": str(opts.port),
        "HF_HUB_OFFLINE": "1",
    }
    if opts.window_pairs:
        env["ODPO_TRAINER_WINDOW_PAIRS"] = str(opts.window_pairs)
    return env


def _wait_ready(url: str, launcher: Launcher, timeout_s: float, console: Console) -> None:
    deadline = time.monotonic() + timeout_s
    with console.status("waiting for vLLM and the gateway (about a minute on a CPU)"):
        while time.monotonic() < deadline:
            launcher.check()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise ComponentDied(f"the gateway was not ready within {timeout_s:.0f}s")


def _served_version(url: str) -> int:
    try:
        resp = httpx.get(f"{url}/readyz", timeout=5)
        return resp.json().get("policy_version", 0) if resp.status_code == 200 else 0
    except httpx.HTTPError:
        return 0


def _follow(launcher, watcher, feeder, url, rounds, started, console) -> LoopCounts:
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            launcher.check()
            counts = watcher.snapshot()
            feeder.top_up(counts.candidate_sets + counts.dead_prompts)
            served = _served_version(url) if counts.adapters else 0
            live.update(_progress_table(counts, feeder.sent, served, time.monotonic() - started, rounds))
            if rounds is not None and counts.latest_version >= rounds and served >= rounds:
                return counts
            time.sleep(1)


def _progress_table(c: LoopCounts, sent: int, served: int, elapsed: float, rounds: int | None) -> Table:
    t = Table(title=f"odpo up · {elapsed:,.0f}s" + (f" · until version {rounds}" if rounds else ""))
    for col in ("served policy", "prompts sent", "candidate sets", "pairs", "dead letters", "loss", "reward acc",
                "margin"):
        t.add_column(col, justify="right")
    last = c.adapters[-1].metrics if c.adapters else None
    fmt = (lambda v: f"{v:.4f}") if last else (lambda v: "-")
    t.add_row(f"v{served}", str(sent), str(c.candidate_sets), str(c.pairs), str(c.dead_letters),
              fmt(last.loss if last else 0), fmt(last.reward_accuracy if last else 0),
              fmt(last.reward_margin if last else 0))
    return t


def _summary(c: LoopCounts, before, after, sent: int, elapsed: float) -> dict:
    return {
        "elapsed_s": round(elapsed, 1),
        "prompts_sent": sent,
        "candidate_sets": c.candidate_sets,
        "pairs": c.pairs,
        "dead_letters": c.dead_letters,
        "versions": [{"version": a.version, "pairs_trained": a.pairs_trained, **a.metrics.model_dump()}
                     for a in c.adapters],
        "heldout": {"prompts": len(before.scores), "base": before.mean_score, "policy": after.mean_score,
                    "policy_version": after.served_version},
    }


def _summary_table(s: dict) -> Table:
    t = Table(title=f"odpo up: {len(s['versions'])} version(s) in {s['elapsed_s']:.0f}s")
    for col in ("version", "pairs trained", "loss", "reward margin", "reward accuracy"):
        t.add_column(col, justify="right")
    for v in s["versions"]:
        t.add_row(f"v{v['version']}", str(v["pairs_trained"]), f"{v['loss']:.4f}", f"{v['reward_margin']:.4f}",
                  f"{v['reward_accuracy']:.2f}")
    h = s["heldout"]
    t.caption = (f"held-out verifier score ({h['prompts']} prompts): base {h['base']:.3f} -> "
                 f"policy-v{h['policy_version']} {h['policy']:.3f}")
    return t


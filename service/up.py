"""`odpo up`: the whole loop on one machine.

Starts the embedded broker, prepares the packaged model, starts every
component as its own `odpo <component>` process, feeds the bundled train
prompts and shows progress: the promoted version, the held-out score of
every version (the gateway's promotion gate scores `base` and each new
version before promoting it) and pairs/s. On a terminal that is a live
table; otherwise one plain line per event. With `--rounds N` it stops once
the gate has decided on version N, prints the versions and their scores,
and writes `summary.json` and `versions.png` into the run folder. Ctrl-C
(or SIGTERM) stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live

from service.assets import base_model_dir
from service.broker import EmbeddedBroker, free_port
from service.bus import ensure_topics, make_producer
from service.launcher import ComponentDied, Launcher
from service.loop_watch import LoopCounts, LoopWatcher
from service.prompt_feed import PromptFeeder
from service.settings import CommonSettings, GeneratorSettings
from service.up_view import EventLog, GatewayAdmin, PairRate, decided_through, progress_table, summary, summary_tables

# (log name, `odpo` command, extra environment). The second judge turns clients' feedback on the gateway
# (/v1/feedback) into pairs, beside the verifier that judges the sampled candidates.
COMPONENTS = (("judge", "judge", {}), ("judge-human", "judge", {"ODPO_JUDGE_JUDGE": "human"}),
              ("trainer", "trainer", {}), ("generator", "generator", {}), ("gateway", "gateway", {}))
STATUS_EVERY_S = 60  # a plain status line this often when stdout is not a terminal


@dataclass
class UpOptions:
    rounds: int | None
    port: int
    run_dir: Path | None
    train_prompts: int
    heldout_prompts: int
    heldout_prompts_max: int
    window_pairs: int | None
    ready_timeout_s: float = 900


def run_up(opts: UpOptions) -> int:
    from service.task import make_prompts

    console = Console(soft_wrap=True)  # long lines (paths) stay whole in logs
    common, gen = CommonSettings(), GeneratorSettings()
    run_dir = (opts.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM shuts down as cleanly as Ctrl-C
    started = time.monotonic()
    broker = launcher = watcher = feeder = None
    counts, view = LoopCounts(), None
    try:
        broker = EmbeddedBroker(log_file=run_dir / "broker.log").start()
        ensure_topics(broker.bootstrap)
        console.print(f"broker: Tansu on {broker.bootstrap}")
        with console.status("preparing the base model (converted once, then cached)"):
            model_dir = base_model_dir(common.cache_dir, common.base_model)
        console.print(f"base model: {model_dir}")
        gateway_url = f"http://127.0.0.1:{opts.port}"
        token = _admin_token(run_dir)
        launcher = Launcher(run_dir / "logs", _child_env(broker.bootstrap, run_dir, opts, model_dir, token, gen))
        for name, command, extra_env in COMPONENTS:
            launcher.start(command, extra_env, name=name)
        console.print(f"components started; logs in {run_dir / 'logs'}")
        _wait_ready(gateway_url, launcher, opts.ready_timeout_s, console)
        console.print(f"gateway: {gateway_url}/v1 (models `policy`, `base`, `policy-v<N>`); admin API "
                      f"{gateway_url}/admin/versions with the bearer token in {run_dir / 'admin-token'}")
        console.print(f"the gate scores `base` and every new version on {opts.heldout_prompts}-"
                      f"{opts.heldout_prompts_max} held-out prompts (task score with its interval, answer length, "
                      "topic, fluency) before promoting it")

        watcher = LoopWatcher(broker.bootstrap)
        watcher.start()
        feeder = PromptFeeder(make_producer(broker.bootstrap), make_prompts("train", opts.train_prompts),
                              backlog=2 * gen.max_in_flight)
        admin = GatewayAdmin(gateway_url, token)
        for counts, view in _follow(launcher, watcher, feeder, admin, opts.rounds, started, console):
            pass
        _finish(console, run_dir, counts, view, feeder.sent, time.monotonic() - started, plot=True)
        return 0
    except KeyboardInterrupt:
        console.print("stopping ...")
        if feeder is not None and (counts.adapters or view):
            _finish(console, run_dir, counts, view, feeder.sent, time.monotonic() - started, plot=False)
        return 130
    except ComponentDied as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        if feeder:
            feeder.close()
        if watcher:
            watcher.stop()
        if launcher:
            launcher.stop()
        if broker:
            broker.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _admin_token(run_dir: Path) -> str:
    """A fresh admin token for this run's gateway, also left in the run folder (owner-only) for the operator."""
    token = secrets.token_urlsafe(24)
    path = run_dir / "admin-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _child_env(bootstrap: str, run_dir: Path, opts: UpOptions, model_dir: Path, token: str,
               gen: GeneratorSettings) -> dict[str, str]:
    vllm_port = free_port()
    env = {
        "ODPO_BOOTSTRAP_SERVERS": bootstrap,
        "ODPO_STORE_DIR": str(run_dir / "store"),
        "ODPO_BASE_MODEL": str(model_dir),
        "ODPO_GENERATOR_VLLM_PORT": str(vllm_port),
        "ODPO_GATEWAY_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
        "ODPO_GENERATOR_LOG_FILE": str(run_dir / "logs" / "vllm.log"),
        "ODPO_GATEWAY_PORT": str(opts.port),
        "ODPO_GATEWAY_ADMIN_TOKEN": token,
        "ODPO_GATEWAY_HELDOUT_PROMPTS": str(opts.heldout_prompts),
        "ODPO_GATEWAY_HELDOUT_PROMPTS_MAX": str(opts.heldout_prompts_max),
        "ODPO_GATEWAY_EVAL_MAX_TOKENS": str(gen.max_tokens),
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
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise ComponentDied(f"the gateway was not ready within {timeout_s:.0f}s")


def _follow(launcher, watcher, feeder, admin: GatewayAdmin, rounds, started, console: Console):
    """Yield (counts, versions view) every second; stops once the gate decided on version `rounds`."""
    events, rate = EventLog(), PairRate()
    terminal = console.is_terminal
    next_status = time.monotonic() + STATUS_EVERY_S
    with Live(console=console, refresh_per_second=2) if terminal else nullcontext() as live:
        while True:
            launcher.check()
            counts = watcher.snapshot()
            feeder.top_up(counts.candidate_sets + counts.dead_prompts)
            view = admin.versions()
            pairs_per_s = rate.update(counts.pairs)
            elapsed = time.monotonic() - started
            lines = events.lines(counts, view)
            if not terminal and time.monotonic() >= next_status:
                next_status += STATUS_EVERY_S
                lines.append(f"{elapsed:.0f}s: policy {view['promoted_name'] if view else '-'}, pairs {counts.pairs} "
                             f"({pairs_per_s:.2f}/s), candidate sets {counts.candidate_sets}, "
                             f"dead letters {counts.dead_letters}")
            for line in lines:
                if terminal:
                    console.print(line)  # shown above the live table
                else:
                    print(line, flush=True)
            if live is not None:
                live.update(progress_table(counts, view, feeder.sent, pairs_per_s, elapsed, rounds))
            yield counts, view
            if rounds is not None and decided_through(view, rounds):
                return
            time.sleep(1)


def _finish(console: Console, run_dir: Path, counts: LoopCounts, view: dict | None, sent: int, elapsed: float,
            plot: bool) -> None:
    s = summary(counts, view, sent, elapsed)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2))
    for table in summary_tables(s):
        console.print(table)
    console.print(f"summary written to {run_dir / 'summary.json'}")
    if plot:
        from service.up_plot import plot_versions

        console.print(f"plot written to {plot_versions(s['versions'], run_dir / 'versions.png')}")

"""`odpo up`: the whole loop on one machine, supervised.

Starts the embedded broker, prepares the packaged model, starts every
component as its own `odpo <component>` process, feeds the bundled train
prompts and shows progress: the promoted version, the held-out score of
every version (the promotion gate, `odpo gate`, scores `base` and each new
version before promoting it) and pairs/s. On a terminal that is a live
table; otherwise one plain line per event. With `--rounds N` it stops once
the gate has decided on N more versions, prints the versions and their
scores, and writes `summary.json` and `versions.png` into the run folder.
Ctrl-C (or SIGTERM) stops everything.

Supervision: a component or the broker that exits is restarted with backoff
(`service.launcher`, `service.up_broker`); a crash loop ends the run with its
last log lines. Restarts are counted in the table, `summary.json` and
`odpo_up_component_restarts_total` on `odpo up`'s own /metrics;
`components.json` in the run folder names every process's pid.

Resume: a run folder that already holds a run (a store with versions, or
`feed.json`) is continued: the trainer starts from the newest version in the
store, the gate keeps its decisions (`<store>/gate-registry.json`), the
prompts continue after the last one fed (`feed.json`), and `--rounds N`
counts N versions beyond the newest one found.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

from core import signing
from core.adapter_store import newest_ready, published_versions
from core.assets import base_model_dir
from core.broker import EmbeddedBroker, free_port
from core.bus import configure_kafka, ensure_topics, make_producer
from service.launcher import ComponentDied, Launcher, RestartPolicy
from service.loop_watch import LoopCounts, LoopWatcher
from service.prompt_feed import FEED_FILE, PromptFeeder, load_position
from service.up_pace import TrainerBacklog
from core.settings import CommonSettings, GeneratorSettings, TrainerSettings
from service.up_broker import NAME as BROKER
from service.up_broker import BrokerKeeper
from service.up_metrics import TrainerDrops, UpMetrics
from service.up_view import (
    LOUD,
    EventLog,
    GateAdmin,
    PairRate,
    decided_through,
    progress_table,
    restarts_text,
    summary,
    summary_tables,
)

# (log name, `odpo` command, extra environment). The second judge turns clients' feedback on the gateway
# (/v1/feedback) into pairs, beside the verifier that judges the sampled candidates.
COMPONENTS = (("judge", "judge", {}), ("judge-human", "judge", {"ODPO_JUDGE_JUDGE": "human"}),
              ("trainer", "trainer", {}), ("generator", "generator", {}), ("gate", "gate", {}),
              ("gateway", "gateway", {}))
STATUS_EVERY_S = 60  # a plain status line this often when stdout is not a terminal
COMPONENTS_FILE = "components.json"


@dataclass
class UpOptions:
    rounds: int | None
    port: int
    run_dir: Path | None
    train_prompts: int
    heldout_prompts: int
    heldout_prompts_max: int
    window_pairs: int | None
    pair_backlog: int | None = None  # pairs the trainer may lag before the feed holds (None: one window; 0: never)
    ready_timeout_s: float = 900
    metrics_port: int = 0
    gate_port: int = 0  # 0: a free one
    restart: RestartPolicy = field(default_factory=RestartPolicy)


def store_version(store: Path) -> int:
    """The newest version in a store (0: none): the announced one, or failing that the newest folder."""
    ready = newest_ready(store)
    return max(ready.version if ready else 0, max(published_versions(store), default=0))


def stop_version(start_version: int, rounds: int | None) -> int | None:
    """The version whose verdict ends the run: `rounds` beyond the one it started from (None: run until stopped)."""
    return start_version + rounds if rounds else None


def earlier_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a run to resume: versions in its store, or prompts already fed."""
    return store_version(run_dir / "store") > 0 or (run_dir / FEED_FILE).exists()


def run_up(opts: UpOptions) -> int:
    from service.task import make_prompts

    console = Console(soft_wrap=True)  # long lines (paths) stay whole in logs
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # reconnect noise while the broker restarts
    common, gen, trainer = CommonSettings(), GeneratorSettings(), TrainerSettings()
    configure_kafka(common.model_copy(update={"kafka_security_protocol": "PLAINTEXT"}))  # the embedded broker
    run_dir = (opts.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM shuts down as cleanly as Ctrl-C
    started = time.monotonic()
    store = run_dir / "store"
    resumed, start_version, position = earlier_run(run_dir), store_version(store), load_position(run_dir)
    target = stop_version(start_version, opts.rounds)
    if resumed:
        console.print(f"resumed at version {start_version} ({run_dir}); prompts continue after the {position} "
                      "already fed" + (f"; stopping at version {target}" if target else ""))
    broker = launcher = watcher = feeder = pace = None
    metrics = UpMetrics([name for name, _, _ in COMPONENTS] + [BROKER])
    counts, view, dropped = LoopCounts(), None, None
    try:
        console.print(f"metrics: http://127.0.0.1:{metrics.serve(opts.metrics_port)}/metrics "
                      "(odpo_up_component_restarts_total, odpo_up_engine_crashes_total)")
        broker = EmbeddedBroker(log_file=run_dir / "broker.log")
        keeper = BrokerKeeper(broker.start(), opts.restart, on_restart=metrics.restarted)
        ensure_topics(broker.bootstrap)
        console.print(f"broker: Tansu on {broker.bootstrap}")
        with console.status("preparing the base model (converted once, then cached)"):
            model_dir = base_model_dir(common.cache_dir, common.base_model)
        console.print(f"base model: {model_dir}")
        gateway_url = f"http://127.0.0.1:{opts.port}"
        token = _admin_token(run_dir)
        secret_env = _secret_env(token, _admin_token(run_dir, "vllm-api-key"))
        env = _child_env(broker.bootstrap, run_dir, opts, model_dir, gen, trainer)
        env.update(_message_key(common))
        gate_url = f"http://127.0.0.1:{env['ODPO_GATE_PORT']}"
        launcher = Launcher(run_dir / "logs", env, policy=opts.restart, state_file=run_dir / COMPONENTS_FILE,
                            on_restart=metrics.restarted, on_exit_cause=metrics.exit_cause, adopt_orphans=True,
                            keep_pids=lambda: {broker.pid} - {None})
        sup = Supervision(launcher, keeper)
        for name, command, extra_env in COMPONENTS:
            launcher.start(command, {**extra_env, **secret_env.get(name, {})}, name=name)
        console.print(f"components started; logs in {run_dir / 'logs'}, pids in {run_dir / COMPONENTS_FILE}")
        _wait_ready([gateway_url, gate_url], sup, opts.ready_timeout_s, console)
        console.print(f"gateway: {gateway_url}/v1 (models `policy`, `base`, `policy-v<N>`); the gate's admin API "
                      f"{gate_url}/admin/versions with the bearer token in {run_dir / 'admin-token'}")
        console.print(f"the gate scores `base` and every new version on {opts.heldout_prompts}-"
                      f"{opts.heldout_prompts_max} held-out prompts (task score with its interval, answer length, "
                      "topic, fluency) before promoting it")

        watcher = LoopWatcher(broker.bootstrap, store=store, max_staleness=trainer.max_staleness)
        watcher.start()
        feeder = PromptFeeder(lambda: make_producer(broker.bootstrap), make_prompts("train", opts.train_prompts,
                                                                                   curriculum=common.task_curriculum),
                              backlog=2 * gen.max_in_flight, start=position, state_file=run_dir / FEED_FILE)
        keeper.on_down, keeper.on_up = _on_broker_down(watcher), _on_broker_up(watcher, feeder)
        window = opts.window_pairs or trainer.window_pairs
        trainer_metrics = f"http://127.0.0.1:{env['ODPO_TRAINER_METRICS_PORT']}/metrics"
        pace = TrainerBacklog(broker.bootstrap, trainer.group_id, window if opts.pair_backlog is None
                              else opts.pair_backlog, trainer_metrics=trainer_metrics).start()
        drops = TrainerDrops(trainer_metrics)
        admin = GateAdmin(gate_url, token)
        for counts, view, dropped in _follow(sup, watcher, feeder, pace, admin, drops, metrics, target,
                                             start_version, started, console):
            pass
        dropped = drops.update(force=True)
        _finish(console, run_dir, counts, view, feeder.sent_this_run, time.monotonic() - started, sup.restarts(),
                start_version if resumed else None, dropped, plot=True)
        return 0
    except KeyboardInterrupt:
        console.print("stopping ...")
        if feeder is not None and (counts.adapters or view):
            _finish(console, run_dir, counts, view, feeder.sent_this_run, time.monotonic() - started,
                    sup.restarts(), start_version if resumed else None, dropped, plot=False)
        return 130
    except ComponentDied as exc:
        console.print(Text("error: ", style="red") + Text(str(exc)))
        return 1
    finally:
        if feeder:
            feeder.close()
        if pace:
            pace.close()
        if watcher:
            watcher.stop()
        if launcher:
            launcher.stop(last=("trainer",))  # the trainer archives what the others published on their way out
        if broker:
            broker.stop()
        metrics.close()


class Supervision:
    """The components and the broker under one tick: restarts, their lines, components.json."""

    def __init__(self, launcher: Launcher, keeper: BrokerKeeper):
        self.launcher, self.keeper = launcher, keeper
        launcher.extra_state[BROKER] = keeper.state()

    def tick(self) -> list[str]:
        lines = self.keeper.check()
        if lines:
            self.launcher.extra_state[BROKER] = self.keeper.state()
            self.launcher.write_state()
        if self.keeper.up:  # components started while the broker is away would only fail again
            lines += self.launcher.supervise()
        return lines

    def restarts(self) -> dict[str, int]:
        return self.launcher.restarts() | {BROKER: self.keeper.restarts}


def _on_broker_down(watcher: LoopWatcher):
    def on_down() -> str | None:
        if not watcher.rewind():
            return "the topic watcher did not rewind in time: counts may be off"
        return None
    return on_down


def _on_broker_up(watcher: LoopWatcher, feeder: PromptFeeder):
    def on_up() -> str:
        c = watcher.snapshot()
        lost = feeder.broker_restarted(c.candidate_sets + c.dead_prompts)
        return f"{lost} prompt(s) waiting in it are skipped"
    return on_up


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _admin_token(run_dir: Path, name: str = "admin-token") -> str:
    """A fresh secret for this run (the gate's admin token, vLLM's API key), also left in the run folder
    (owner-only) for the operator."""
    token = secrets.token_urlsafe(24)
    path = run_dir / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _message_key(common: CommonSettings) -> dict[str, str]:
    """The message key of this run (core/signing.py), for the children's environment; this process (the prompt
    feed) signs with it too. One the operator set is used as it is; else a fresh one per run, kept in memory only
    (the run's broker is memory-only too, so nothing signed with it outlives the run)."""
    if common.message_key is not None or common.message_key_file is not None:
        signing.configure_from(common)
        return {}
    key = f"up-{secrets.token_hex(3)}:{secrets.token_urlsafe(32)}"
    signing.configure(signing.parse_keys(key))
    return {"ODPO_MESSAGE_KEY": key}


def _secret_env(token: str, vllm_key: str) -> dict[str, dict[str, str]]:
    """Each component's secrets, given to that component only (not in the environment every child shares):
    the admin token to the gate, vLLM's API key to the generator (vLLM's own key, and the one its sampler and
    adapter loader send) and to vLLM's other clients, the gate and the gateway."""
    return {"gate": {"ODPO_GATE_ADMIN_TOKEN": token, "ODPO_GATE_VLLM_API_KEY": vllm_key},
            "generator": {"ODPO_GENERATOR_VLLM_API_KEY": vllm_key},
            "gateway": {"ODPO_GATEWAY_VLLM_API_KEY": vllm_key}}


def _child_env(bootstrap: str, run_dir: Path, opts: UpOptions, model_dir: Path,
               gen: GeneratorSettings, trainer: TrainerSettings) -> dict[str, str]:
    vllm_port = free_port()
    env = {
        "ODPO_BOOTSTRAP_SERVERS": bootstrap,
        # the embedded broker speaks plain Kafka, whatever security settings this shell holds for another one
        "ODPO_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "ODPO_STORE_DIR": str(run_dir / "store"),
        "ODPO_BASE_MODEL": str(model_dir),
        "ODPO_GENERATOR_VLLM_PORT": str(vllm_port),
        "ODPO_GATEWAY_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
        "ODPO_GATE_VLLM_URL": f"http://127.0.0.1:{vllm_port}",
        "ODPO_GENERATOR_LOG_FILE": str(run_dir / "logs" / "vllm.log"),
        "ODPO_GATEWAY_PORT": str(opts.port),
        "ODPO_GATE_PORT": str(opts.gate_port or free_port()),  # fixed for the run: kept over the gate's restarts
        "ODPO_GATE_HELDOUT_PROMPTS": str(opts.heldout_prompts),
        "ODPO_GATE_HELDOUT_PROMPTS_MAX": str(opts.heldout_prompts_max),
        "ODPO_GATE_EVAL_MAX_TOKENS": str(gen.max_tokens),
        # a dead vLLM ends the generator, so it is restarted and counted here like any component
        "ODPO_GENERATOR_RESTART_SERVER": os.environ.get("ODPO_GENERATOR_RESTART_SERVER", "false"),
        # a fixed port (kept over restarts) so `odpo up` can read the trainer's stale-pair count
        "ODPO_TRAINER_METRICS_PORT": str(trainer.metrics_port or free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    if opts.window_pairs:
        env["ODPO_TRAINER_WINDOW_PAIRS"] = str(opts.window_pairs)
    return env


def _say(console: Console, line: str, style: str | None = None) -> None:
    """One event line: above the live table on a terminal, a plain line otherwise (a log file)."""
    if console.is_terminal:
        console.print(line, style="bold red" if line.startswith(LOUD) else style, markup=False, highlight=False)
    else:
        print(line, flush=True)


def _wait_ready(urls: list[str], sup: Supervision, timeout_s: float, console: Console) -> None:
    """Until each of `urls` (the gateway, the gate) answers /readyz with 200."""
    deadline = time.monotonic() + timeout_s
    waiting = list(urls)
    with console.status("waiting for vLLM, the gateway and the gate (about a minute on a CPU)"):
        while time.monotonic() < deadline:
            for line in sup.tick():
                _say(console, line, "yellow")
            try:
                while waiting and httpx.get(f"{waiting[0]}/readyz", timeout=5).status_code == 200:
                    waiting.pop(0)
            except httpx.HTTPError:
                pass
            if not waiting:
                return
            time.sleep(1)
    raise ComponentDied(f"{waiting[0]} was not ready within {timeout_s:.0f}s")


def _follow(sup: Supervision, watcher: LoopWatcher, feeder: PromptFeeder, pace: TrainerBacklog, admin: GateAdmin,
            drops: TrainerDrops, metrics: UpMetrics, target: int | None, start_version: int, started: float, console: Console):
    """Yield (counts, versions view, pairs the trainer dropped as stale) every second; stops once the gate decided
    on version `target`."""
    events, rate = EventLog(skip_through=start_version), PairRate()
    terminal = console.is_terminal
    next_status = time.monotonic() + STATUS_EVERY_S
    with Live(console=console, refresh_per_second=2) if terminal else nullcontext() as live:
        while True:
            for line in sup.tick():
                _say(console, line, "yellow")
            counts = watcher.snapshot()
            if sup.keeper.up and not pace.full():
                feeder.top_up(counts.candidate_sets + counts.dead_prompts)
            metrics.trainer_lag.set(pace.lag if pace.lag is not None else float("nan"))
            view = admin.versions()
            dropped = drops.update()
            st = counts.stale
            metrics.stale_ratio.set(st.stale / st.window if st.window else 0.0)
            pairs_per_s = rate.update(counts.pairs)
            elapsed = time.monotonic() - started
            lines = events.lines(counts, view)
            if not terminal and time.monotonic() >= next_status:
                next_status += STATUS_EVERY_S
                lines.append(f"{elapsed:.0f}s: policy {view['promoted_name'] if view else '-'}, pairs {counts.pairs} "
                             f"({pairs_per_s:.2f}/s), stale now {st.stale}/{st.window}, dropped as stale "
                             f"{dropped}, trainer lag {pace.lag} ({pace.pending} to train), feed held {pace.held_s:.0f}s, candidate sets "
                             f"{counts.candidate_sets}, dead letters "
                             f"{counts.dead_letters}, restarts {restarts_text(sup.restarts())}")
            for line in lines:
                _say(console, line)
            if live is not None:
                live.update(progress_table(counts, view, feeder.sent_this_run, pairs_per_s, elapsed, target, sup.restarts(),
                                           dropped))
            yield counts, view, dropped
            if target is not None and decided_through(view, target):
                return
            time.sleep(1)


def _finish(console: Console, run_dir: Path, counts: LoopCounts, view: dict | None, sent: int, elapsed: float,
            restarts: dict[str, int], resumed_from: int | None, dropped: int | None, plot: bool) -> None:
    s = summary(counts, view, sent, elapsed, restarts=restarts, resumed_from=resumed_from, dropped_stale=dropped)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2))
    for table in summary_tables(s):
        console.print(table)
    console.print(f"summary written to {run_dir / 'summary.json'}")
    if plot:
        from service.up_plot import plot_versions

        console.print(f"plot written to {plot_versions(s['versions'], run_dir / 'versions.png')}")

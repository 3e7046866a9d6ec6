"""The `odpo` command: every component, the embedded broker, and `odpo up` for the whole loop.

Bad input (a wrong setting, a missing file) is one line on stderr and exit code 2.
Components are imported only by the subcommand that runs them, so `odpo gateway`
never imports torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from core.errors import UsageError


COMPONENTS = (("generator", "GeneratorSettings", "vLLM server + sampler + adapter hot-swap."),
              ("judge", "JudgeSettings", "Score candidates, publish preference pairs."),
              ("trainer", "TrainerSettings", "Rolling LoRA DPO updates, publish adapters."),
              ("gateway", "GatewaySettings", "OpenAI-compatible HTTP front door (any number of replicas)."),
              ("gate", "GateSettings", "Promotion gate: scores new versions, the registry's one writer, admin API."))


def _settings(cls):
    """`cls` from the environment and ODPO_CONFIG, or a UsageError: an ODPO_* variable that is no setting, an
    unknown section or key of the config file, or a bad value (named by variable and section.field).
    CommonSettings also configure this process's Kafka clients."""
    from core.settings import check_environment

    try:
        check_environment()
        settings = cls()
        if cls.__name__ == "CommonSettings":
            from core.bus import configure_kafka

            configure_kafka(settings)  # reads the SASL password file now: a missing one is one line here
        return settings
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "?"
        prefix = cls.model_config.get("env_prefix", "")
        raise UsageError(f"invalid setting {prefix}{where.upper()} ({cls._section.default}.{where}): "
                         f"{err.get('msg')}") from None
    except (ValueError, OSError) as exc:  # an unknown variable, an unreadable or malformed ODPO_CONFIG file
        raise UsageError(str(exc).splitlines()[0]) from None


def _at_least(**given: tuple[float | None, float]) -> None:
    """A UsageError naming the first option whose value is below its minimum (None: not given)."""
    for option, (value, minimum) in given.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{option.replace('_', '-')} must be >= {minimum:g} (got {value:g})")


def _run_component(name: str) -> int:
    from core import settings as s
    from core.runtime import setup_logging, stop_on_signals

    component_settings = getattr(s, next(cls for n, cls, _ in COMPONENTS if n == name))
    common, settings = _settings(s.CommonSettings), _settings(component_settings)
    setup_logging(common.log_level, common.log_format, name)
    if name in ("gateway", "gate"):
        return _run_http(name, settings, common)
    if name == "generator":
        from generator.service import run
    elif name == "judge":
        from judge.service import run
    else:
        from trainer.service import run
    run(common, settings, stop_on_signals())
    return 0


def _run_http(name: str, settings, common) -> int:
    import uvicorn

    if name == "gate":
        from service.gate import create_gate_app as create_app
    else:
        from service.gateway import create_app

    uvicorn.run(create_app(settings, common), host=settings.host, port=settings.port, log_level="warning")
    return 0


def _run_broker(args) -> int:
    import time

    from core.broker import EmbeddedBroker
    from core.bus import ensure_topics
    from core.runtime import stop_on_signals

    stop = stop_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        ensure_topics(broker.bootstrap)
        print(f"ODPO_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        while not stop.is_set() and broker.running:
            time.sleep(0.5)
    return 0


def _prepare_model(args) -> int:
    from core.assets import AssetError, base_model_dir
    from core.runtime import setup_logging
    from core.settings import CommonSettings

    common = _settings(CommonSettings)
    setup_logging(common.log_level, common.log_format)
    try:
        print(base_model_dir(common.cache_dir, common.base_model))
    except AssetError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _up(args) -> int:
    from core import settings as s
    from service.launcher import RestartPolicy
    from service.up import UpOptions, earlier_run, run_up

    _at_least(rounds=(args.rounds, 1), pair_backlog=(args.pair_backlog, 0), max_restarts=(args.max_restarts, 0),
              restart_window=(args.restart_window, 1), train_prompts=(args.train_prompts, 1),
              heldout_prompts=(args.heldout_prompts, 1), heldout_prompts_max=(args.heldout_prompts_max, 1),
              window_pairs=(args.window_pairs, 1), port=(args.port, 1), metrics_port=(args.metrics_port, 0))
    if args.resume is not None and not earlier_run(args.resume):
        raise UsageError(f"--resume {args.resume}: no earlier run there (no versions in its store, no feed.json)")
    if args.gate_port < 0 or args.gate_port > 65535 or args.gate_port == args.port:
        raise UsageError("--gate-port must be a free port other than --port (0: pick one)")
    # every component's settings, as its process will read them: one line now, not a crash loop later
    for cls in (s.CommonSettings, *(getattr(s, cls) for _, cls, _ in COMPONENTS)):
        _settings(cls)
    opts = UpOptions(rounds=args.rounds, port=args.port, run_dir=args.resume or args.run_dir,
                     train_prompts=args.train_prompts, heldout_prompts=args.heldout_prompts,
                     heldout_prompts_max=max(args.heldout_prompts_max, args.heldout_prompts),
                     window_pairs=args.window_pairs, pair_backlog=args.pair_backlog, metrics_port=args.metrics_port,
                     gate_port=args.gate_port,
                     restart=RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window))
    return run_up(opts)


def _eval(args) -> int:
    from service.eval_run import EvalOptions, run_eval

    _at_least(prompts=(args.prompts, 1), max_tokens=(args.max_tokens, 1), concurrency=(args.concurrency, 1),
              examples=(args.examples, 0), suite_max_tokens=(args.suite_max_tokens, 1),
              suite_limit=(args.suite_limit, 1))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise UsageError("--models names no model")
    return run_eval(EvalOptions(models=models, url=args.url, reference=args.reference, prompts=args.prompts,
                                prompts_file=args.prompts_file, max_tokens=args.max_tokens, out=args.out,
                                reference_logprob=not args.no_reference_logprob, win_judge=args.win_judge,
                                concurrency=args.concurrency, examples=args.examples, base_model=args.base_model,
                                suites=args.suite or ["bundled"], suite_max_tokens=args.suite_max_tokens,
                                suite_limit=args.suite_limit, api_key=_eval_api_key(args)))


def _eval_api_key(args) -> str | None:
    """`--api-key-file`, else ODPO_EVAL_API_KEY (never a command-line value: `ps` would show it)."""
    import os

    if args.api_key_file is None:
        return os.environ.get("ODPO_EVAL_API_KEY") or None
    try:
        key = args.api_key_file.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file: {exc}") from None
    if not key:
        raise UsageError(f"--api-key-file {args.api_key_file} is empty")
    return key


def _add_eval(sub) -> None:
    c = sub.add_parser("eval", help="Compare served models on held-out prompts: task score with intervals, "
                                    "win rate, degeneration signals.")
    c.add_argument("--models", default="base,policy",
                   help="Comma-separated NAME, LABEL=NAME or LABEL=NAME@URL (default: base,policy).")
    c.add_argument("--url", default="http://127.0.0.1:8000", help="OpenAI-compatible server of models without @URL.")
    c.add_argument("--reference", default=None, help="Label of the reference model (default: the first).")
    c.add_argument("--prompts", type=int, default=200, help="Held-out prompts (the first N of the bundled set or file).")
    c.add_argument("--prompts-file", type=Path, default=None,
                   help="JSONL prompts with a `task` each (formats: `odpo prompts load`).")
    c.add_argument("--max-tokens", type=int, default=48, help="Most new tokens per answer (greedy).")
    c.add_argument("--out", type=Path, default=None, help="Folder for eval.json and eval.png (default: runs/eval-<time>).")
    c.add_argument("--no-reference-logprob", action="store_true",
                   help="Skip the base model's log-prob per token of each answer (no model loaded here).")
    c.add_argument("--win-judge", choices=("composite", "llm_judge", "none"), default="composite",
                   help="Judge of the win rate: the rules x quality guard judge (default), the LLM judge "
                        "(ODPO_JUDGE_LLM_JUDGE_* settings), or none.")
    c.add_argument("--concurrency", type=int, default=8, help="Requests in flight per model.")
    c.add_argument("--api-key-file", type=Path, default=None,
                   help="File with a key sent as `Authorization: Bearer` to every model's URL, e.g. vLLM's API key "
                        "(`runs/<time>/vllm-api-key` of `odpo up`); default: $ODPO_EVAL_API_KEY, if set.")
    c.add_argument("--examples", type=int, default=5, help="Prompts whose answers are printed side by side.")
    c.add_argument("--base-model", type=Path, default=None, help="Reference model folder (default: the packaged one).")
    c.add_argument("--suite", action="append", default=None, metavar="SUITE",
                   help="What to evaluate on, repeatable: 'bundled' (the held-out task; the default) and/or "
                        "'ifeval=FILE', a public instruction-following benchmark in IFEval's JSONL format "
                        "scored by its official checkers (a copy: benchmarks/data/ifeval/input_data.jsonl).")
    c.add_argument("--suite-max-tokens", type=int, default=256, help="Most new tokens per benchmark answer.")
    c.add_argument("--suite-limit", type=int, default=None, help="Only the first N benchmark prompts.")
    c.set_defaults(func=_eval)


def _offline(args) -> int:
    """`odpo eval-pairs` / `odpo train` on a JSONL file of pairs (trainer/offline.py)."""
    from core.assets import AssetError, base_model_dir
    from core.runtime import setup_logging
    from core.settings import CommonSettings
    from trainer.offline import BadInput, eval_pairs, train_pairs, trainer_settings

    common = _settings(CommonSettings)
    setup_logging(common.log_level, common.log_format)
    try:
        model_dir = base_model_dir(common.cache_dir, args.base_model or common.base_model)
        settings = trainer_settings(**{k: getattr(args, k, None) for k in (
            "beta", "loss_type", "label_smoothing", "max_length", "batch_pairs", "window_pairs", "steps_per_window")})
        if args.command == "eval-pairs":
            eval_pairs(model_dir, args.pairs, args.adapter, settings, args.on_error)
        else:
            train_pairs(model_dir, args.pairs, (args.store or common.store_dir).expanduser(), settings, args.on_error,
                        cache_dir=common.cache_dir)
    except (AssetError, BadInput) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _add_offline(sub) -> None:
    for name, text in (("eval-pairs", "Per-pair log-probs and DPO loss of a JSONL file of pairs (JSON lines out)."),
                       ("train", "Offline DPO on a JSONL file of pairs, writing policy-v<N> adapters.")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--pairs", type=Path, required=True,
                       help="JSONL file: TRL-style prompt/chosen/rejected objects or PreferencePairs.")
        c.add_argument("--base-model", type=Path, default=None, help="HF model folder (default: the packaged model).")
        c.add_argument("--beta", type=float, default=None, help="DPO beta (default: ODPO_TRAINER_BETA or 0.1).")
        c.add_argument("--loss-type", default=None, help="sigmoid, ipo, hinge, robust, ... (trainer/losses/).")
        c.add_argument("--label-smoothing", type=float, default=None,
                       help="Label-flip probability (sigmoid, robust, exo_pair, aot).")
        c.add_argument("--max-length", type=int, default=None, help="Prompt + completion tokens kept.")
        c.add_argument("--batch-pairs", type=int, default=None, help="Pairs per forward micro-batch.")
        c.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="A bad line stops the command (exit 2) or is reported with its line number and skipped.")
        if name == "eval-pairs":
            c.add_argument("--adapter", type=Path, default=None,
                           help="LoRA adapter folder of the policy (default: none, policy = reference = base).")
        else:
            c.add_argument("--store", type=Path, default=None, help="Adapter store (default: ODPO_STORE_DIR).")
            c.add_argument("--window-pairs", type=int, default=None, help="Pairs per update (one version each).")
            c.add_argument("--steps-per-window", type=int, default=None, help="Optimizer steps per update.")
        c.set_defaults(func=_offline)


def _load_dataset(args) -> int:
    from core.dataset_load import LoadError, load_and_publish
    from core.settings import CommonSettings

    common = _settings(CommonSettings)
    try:
        print(load_and_publish(args.file, args.kind, common.bootstrap_servers, args.on_error,
                               report=lambda line: print(line, file=sys.stderr)))
    except LoadError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _add_loaders(sub) -> None:
    for kind, topic in (("pairs", "odpo.preferences"), ("prompts", "odpo.prompts")):
        group = sub.add_parser(kind, help=f"Dataset {kind} onto {topic}.").add_subparsers(dest="action", required=True)
        c = group.add_parser("load", help=f"Check a JSONL file of {kind} line by line and publish it to {topic}.")
        c.add_argument("file", type=Path, help="JSONL file (formats: core/dataset_load.py).")
        c.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                       help="Any bad line publishes nothing (exit 2), or bad lines are reported and skipped.")
        c.set_defaults(func=_load_dataset, kind=kind)
        if kind == "pairs":
            e = group.add_parser("export", help="Write the store's pair archive as one JSONL dataset "
                                                "(trainer/export.py), each pair once.")
            e.add_argument("--store", type=Path, default=None, help="Adapter store (default: ODPO_STORE_DIR).")
            e.add_argument("--out", type=Path, required=True, help="JSONL file to write.")
            e.add_argument("--format", choices=("trl", "odpo"), default="trl",
                           help="trl: TRL's prompt/chosen/rejected preference format (what DPOTrainer and odpo "
                                "train read); odpo: PreferencePair lines with their token ids.")
            e.set_defaults(func=_export_pairs)


def _export_pairs(args) -> int:
    from core.settings import CommonSettings
    from trainer.export import ExportError, export_pairs

    store = args.store if args.store is not None else _settings(CommonSettings).store_dir
    try:
        print(export_pairs(store.expanduser(), args.out, args.format).line())
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _export_adapter(args) -> int:
    """`odpo adapters export`: a version as a merged model folder and/or a peft adapter folder."""
    import tempfile

    from core.assets import AssetError, base_model_dir
    from core.settings import CommonSettings
    from trainer.adapter_export import (
        AdapterExportError,
        check_base,
        choose_version,
        export_merged,
        export_peft,
        stage_verified,
    )

    if args.merged is None and args.peft is None:
        raise UsageError("adapters export: say what to write, --merged OUT and/or --peft OUT")
    if args.merged is not None and args.peft is not None and \
            args.merged.expanduser().absolute() == args.peft.expanduser().absolute():
        raise UsageError("--merged and --peft name the same folder")
    common = _settings(CommonSettings)
    store = (args.store if args.store is not None else common.store_dir).expanduser()
    try:
        chosen = choose_version(store, args.version)
        base_dir = None
        if args.merged is not None:
            base_dir = base_model_dir(common.cache_dir, args.base_model or common.base_model)
            check_base(chosen, base_dir)
        with tempfile.TemporaryDirectory(prefix="odpo-export-") as tmp:
            adapter = stage_verified(store, chosen, Path(tmp))
            if args.peft is not None:
                export_peft(chosen, adapter, args.peft.expanduser())
                print(f"exported {chosen.name} ({chosen.why}) as a peft adapter to {args.peft}")
            if args.merged is not None:
                export_merged(chosen, adapter, base_dir, args.merged.expanduser())
                print(f"exported {chosen.name} ({chosen.why}) merged into {base_dir} to {args.merged}")
    except (AdapterExportError, AssetError) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _add_adapters(sub) -> None:
    group = sub.add_parser("adapters", help="Adapter versions of the store.").add_subparsers(dest="action",
                                                                                             required=True)
    e = group.add_parser("export", help="Export a version (its sha256 checked against the store's record) as a "
                                        "merged HF model folder and/or a peft adapter folder with a model card "
                                        "(trainer/adapter_export.py).")
    e.add_argument("--merged", type=Path, default=None, metavar="OUT",
                   help="Write the base model with the adapter merged in (float32, safetensors, tokenizer, "
                        "generation config): a folder transformers and `vllm serve` load as it is.")
    e.add_argument("--peft", type=Path, default=None, metavar="OUT",
                   help="Write adapter_config.json, adapter_model.safetensors and a README.md model card "
                        "(version, base model, pairs trained, held-out score, training settings).")
    e.add_argument("--store", type=Path, default=None, help="Adapter store (default: ODPO_STORE_DIR).")
    e.add_argument("--version", type=int, default=None, metavar="N",
                   help="Version to export (default: the one the gate promoted, from <store>/gate-registry.json; "
                        "else the newest announced one).")
    e.add_argument("--base-model", type=Path, default=None,
                   help="HF folder of the base model the version was trained on, for --merged (default: "
                        "ODPO_BASE_MODEL or the packaged model).")
    e.set_defaults(func=_export_adapter)


def _int_option(name: str, text: str | None, minimum: int) -> int | None:
    """An integer option parsed here (argparse's own errors are several lines): None when not given."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--{name} must be a whole number (got {text!r})") from None
    if value < minimum:
        raise UsageError(f"--{name} must be >= {minimum} (got {value})")
    return value


def _dlq_replay(args) -> int:
    """`odpo dlq replay`: a topic's dead letters back onto it, each once (service/dlq.py)."""
    from kafka.errors import KafkaError

    from core.broker import kafka_ready
    from core.settings import CommonSettings
    from service.dlq import ReplayOptions, check_topic, parse_since, replay

    if args.topic is None:
        raise UsageError("dlq replay: say which topic's dead letters to replay, --topic TOPIC")
    if args.since is not None and args.from_offset is not None:
        raise UsageError("--since and --from-offset: give one of them")
    limit = _int_option("limit", args.limit, 1)
    from_offset = _int_option("from-offset", args.from_offset, 0)
    since = parse_since(args.since) if args.since is not None else None
    common = _settings(CommonSettings)  # the topic prefix, the message key, Kafka's security settings
    opts = ReplayOptions(topic=check_topic(args.topic), since=since, from_offset=from_offset, dry_run=args.dry_run,
                         limit=limit, resign=args.resign)
    if not kafka_ready(common.bootstrap_servers, 5.0):
        raise UsageError(f"cannot read or write the broker at {common.bootstrap_servers}: it does not answer")
    try:
        report = replay(common.bootstrap_servers, opts)
    except (KafkaError, TimeoutError) as exc:
        raise UsageError(f"cannot read or write the broker at {common.bootstrap_servers}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    print(report.table())
    return 0


def _add_dlq(sub) -> None:
    group = sub.add_parser("dlq", help="The dead-letter queue (odpo.dlq).").add_subparsers(dest="action",
                                                                                         required=True)
    r = group.add_parser("replay", help="Validate a topic's dead letters again and publish the valid ones back to "
                                        "it, signed, each once (a marker on odpo.dlq.replayed; service/dlq.py). "
                                        "Prints a row per dead letter: replayed, still invalid (why), skipped.")
    r.add_argument("--topic", default=None, metavar="TOPIC",
                   help="Source topic whose dead letters to replay, e.g. odpo.preferences (the topic prefix is "
                        "added).")
    r.add_argument("--since", default=None, metavar="ISO",
                   help="Only dead letters written at or after this time (ISO 8601; no zone: UTC).")
    r.add_argument("--from-offset", default=None, metavar="N", help="Only dead letters from this odpo.dlq offset "
                                                                    "on (in each of its partitions).")
    r.add_argument("--limit", default=None, metavar="N", help="Replay at most N dead letters.")
    r.add_argument("--dry-run", action="store_true", help="Show what would be replayed; write nothing.")
    r.add_argument("--resign", action="store_true",
                   help="Also replay records dead-lettered for their signature, signed with this process's key "
                        "(only once you know who wrote them: a forged record would be signed too).")
    r.set_defaults(func=_dlq_replay)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("odpo")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _settings_help(name: str, cls_name: str) -> str:
    """Every setting of a component (and the common ones), for its --help: variable, default, meaning."""
    from core import settings as s

    lines = ["settings (environment variable, or the key in section of the ODPO_CONFIG YAML file):"]
    for cls in (getattr(s, cls_name), s.CommonSettings):
        prefix, section = cls.model_config["env_prefix"], cls._section.default
        lines.append(f"  [{section}]")
        for field, info in cls.model_fields.items():
            default = "(secret)" if "secret" in str(info.annotation).lower() else repr(info.get_default(
                call_default_factory=True))
            lines.append(f"  {prefix}{field.upper()} = {default}")
            lines.append(f"      {info.description or ''}")
    return "\n".join(lines)


def _config_show(args) -> int:
    import yaml

    from core import settings as s

    classes = {"common": s.CommonSettings, **{n: getattr(s, cls) for n, cls, _ in COMPONENTS}}
    shown = {name: _settings(cls).model_dump(mode="json") for name, cls in classes.items()
             if args.section in (None, name)}
    print(yaml.safe_dump(shown, sort_keys=False, width=120), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="odpo", description="Online DPO: sample, judge, train, hot-swap, repeat.")
    p.add_argument("--version", action="version", version=f"odpo {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Run the whole loop on this machine (embedded broker, packaged model).")
    up.add_argument("--rounds", type=int, default=None,
                    help="Stop once the gate has decided on this many new adapter versions (on a resumed run "
                         "folder: this many beyond the newest version already in its store).")
    up.add_argument("--port", type=int, default=8000, help="Port of the gateway on 127.0.0.1.")
    up.add_argument("--gate-port", type=int, default=0,
                    help="Port of the gate (admin API, /metrics) on 127.0.0.1 (default: a free one, printed).")
    where = up.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path, default=None,
                       help="Run folder: logs, adapter store, summary (default: a new runs/ folder). A folder that "
                            "holds an earlier run is resumed: newest version, the gate's decisions, prompt position.")
    where.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="Resume the run in RUN_DIR (as --run-dir, but refuses a folder without an earlier run).")
    up.add_argument("--metrics-port", type=int, default=0,
                    help="Port of odpo up's own /metrics (restarts per component; default: a free one, printed).")
    up.add_argument("--max-restarts", type=int, default=5,
                    help="A component (or the broker) that exits more often than this within --restart-window "
                         "seconds is a crash loop: the run stops with its last log lines. Restarts back off from 1 s "
                         "doubling to 30 s.")
    up.add_argument("--restart-window", type=float, default=300, help="Seconds of the crash-loop window.")
    up.add_argument("--train-prompts", type=int, default=256, help="Bundled train prompts to cycle through.")
    up.add_argument("--heldout-prompts", type=int, default=48,
                    help="Held-out prompts the promotion gate scores every version on first (it doubles them while "
                         "its interval is wider than the tolerance, up to --heldout-prompts-max).")
    up.add_argument("--heldout-prompts-max", type=int, default=128, help="Most held-out prompts the gate scores.")
    up.add_argument("--window-pairs", type=int, default=None, help="Pairs per DPO update (trainer setting).")
    up.add_argument("--pair-backlog", type=int, default=None, metavar="PAIRS",
                    help="Hold new prompts while the trainer lags this many pairs or more behind odpo.preferences "
                         "(its window under way and those waiting), so pairs are not stale before it reads them "
                         "(default: one window; 0: never hold).")
    up.set_defaults(func=_up)

    for name, cls, text in COMPONENTS:
        c = sub.add_parser(name, help=text, description=text, epilog=_settings_help(name, cls),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.set_defaults(func=lambda args, name=name: _run_component(name))
    cfg = sub.add_parser("config", help="Show the effective settings (environment, ODPO_CONFIG, defaults).")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="Print every section's effective settings as YAML (secrets masked).")
    show.add_argument("--section", choices=("common", *(n for n, _, _ in COMPONENTS)), default=None,
                      help="Only this section.")
    show.set_defaults(func=_config_show)

    b = sub.add_parser("broker", help="Run the embedded Tansu broker (memory only) in the foreground.")
    b.add_argument("--port", type=int, default=None, help="Port on 127.0.0.1 (default: a free one).")
    b.set_defaults(func=_run_broker)

    m = sub.add_parser("prepare-model", help="Convert the packaged base model once and print its folder.")
    m.set_defaults(func=_prepare_model)
    _add_offline(sub)
    _add_loaders(sub)
    _add_adapters(sub)
    _add_dlq(sub)
    _add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"odpo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`odpo eval-pairs` and `odpo train`: the trainer's numbers and updates on a static JSONL file of pairs.

eval-pairs prints one JSON object per pair (policy and reference log-probs of
both sides, the loss, the reward margin), then a summary line. The policy is
the base model with `--adapter` (or without one: then policy = reference).

train runs the same rolling updates as the streaming trainer over the file's
pairs, in file order, `window_pairs` at a time, and writes each update as the
next `policy-v<N>` of the store (resuming from its newest version; pairs
already in its ledger are skipped). It prints one JSON line per version, and
reports each to the `report_to` experiment trackers as the service does
(trainer/tracking.py).
Nothing is announced on Kafka (and no manifest written); an `odpo trainer`
started later on the same store announces the newest version at start. Store
retention (`keep_versions`, trainer/retention.py) applies after each version,
as in the service.

Bad lines (file format: trainer/pairs_file.py) stop the command before any
model work (`--on-error stop`, exit code 2), or are reported on stderr with
their line number and left out (`--on-error skip`).

Under torchrun (`torchrun --nproc-per-node N -m service.cli train ...`) every
rank reads and tokenizes the file itself (the same pairs in the same order, no
broadcast needed), each window is split over the ranks (trainer/distributed.py),
and rank 0 alone writes the versions, applies retention and prints.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from core.settings import TrainerSettings
from trainer.pairs_file import BadLine, read_pairs
from trainer.tokenize import TokenizedPair, UntrainablePair, tokenize_pair

log = logging.getLogger(__name__)


class BadInput(Exception):
    """The user's input cannot be used; one line for stderr, exit code 2."""


@dataclass
class Loaded:
    pairs: list[TokenizedPair]
    lines: list[int]  # the line number of each pair
    skipped: int


def trainer_settings(**overrides) -> TrainerSettings:
    """TrainerSettings from the environment / ODPO_CONFIG with the command line's values on top."""
    try:
        return TrainerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        raise BadInput(f"invalid {where}: {err.get('msg')}") from None


def load_pairs(path: Path, tokenizer, settings: TrainerSettings, on_error: str, vocab_size: int | None = None,
               skip_ids: set[str] | None = None, report: bool = True) -> Loaded:
    """Tokenize every pair of `path`; a bad line stops (BadInput) or is left out (reported when `report`)."""
    if not Path(path).is_file():
        raise BadInput(f"{path}: no such file")
    out, seen = Loaded([], [], 0), {}
    for item in read_pairs(path):
        try:
            if isinstance(item, BadLine):
                raise item
            pair = item.pair
            if pair.id in seen:
                raise BadLine(item.number, f"pair id {pair.id!r} is also on line {seen[pair.id]}")
            seen[pair.id] = item.number
            if skip_ids is not None and pair.id in skip_ids:
                continue
            try:
                tokenized = tokenize_pair(pair, tokenizer, settings.max_length, vocab_size)
            except UntrainablePair as exc:
                raise BadLine(item.number, f"untrainable: {exc}") from None
        except BadLine as bad:
            if on_error == "stop":
                raise BadInput(f"{path}: {bad}") from None
            if report:
                print(f"odpo: skipped {path}: {bad}", file=sys.stderr)
            out.skipped += 1
            continue
        out.pairs.append(tokenized)
        out.lines.append(item.number)
    return out


def eval_pairs(model_dir: Path, pairs_file: Path, adapter: Path | None, settings: TrainerSettings,
               on_error: str = "stop", out=None) -> dict:
    """Print per-pair numbers and a summary line as JSON; returns the summary."""
    from transformers import AutoTokenizer

    from trainer.losses import reward_metrics
    from trainer.model import load_policy
    from trainer.recipe import Trainer
    from trainer.window import merge_outputs

    out = out or sys.stdout
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise BadInput(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")
    loaded = load_pairs(pairs_file, AutoTokenizer.from_pretrained(model_dir), settings, on_error)
    trainer = Trainer(load_policy(model_dir, settings, adapter_dir=adapter), settings)
    losses, scored, ref = trainer.score(loaded.pairs) if loaded.pairs else ([], [], {})
    i = 0
    for loss_out, sc in zip(losses, scored):
        for j in range(len(sc.logps)):
            p = loaded.pairs[i]
            pc, pr = sc.logps[j].tolist()
            rc, rr = ref[p.pair_id].tolist()
            row = {"line": loaded.lines[i], "id": p.pair_id, "policy_chosen_logp": pc, "policy_rejected_logp": pr,
                   "ref_chosen_logp": rc, "ref_rejected_logp": rr, "loss": loss_out.losses[j].item(),
                   "reward_margin": (loss_out.chosen_rewards[j] - loss_out.rejected_rewards[j]).item()}
            print(json.dumps(row), file=out)
            i += 1
    summary = {"pairs": len(loaded.pairs), "skipped_lines": loaded.skipped, "loss_type": settings.loss_type,
               "beta": settings.beta}
    if losses:
        merged = merge_outputs(losses)
        summary.update(loss=merged.losses.mean().item(), **reward_metrics(merged))
    print(json.dumps({"summary": summary}), file=out, flush=True)
    return summary


def train_pairs(model_dir: Path, pairs_file: Path, store: Path, settings: TrainerSettings,
                on_error: str = "stop", out=None, cache_dir: Path | None = None) -> list[dict]:
    """Rolling updates over the file's untrained pairs; one JSON line per version written. `report_to` trackers
    (trainer/tracking.py; TensorBoard's default folder under `cache_dir`) get each version's metrics."""
    from core.settings import CommonSettings
    from trainer.checkpoint import recipe_settings, remove_staging_leftovers
    from trainer.distributed import Ranks
    from trainer.recipe import Trainer
    from trainer.tracking import Tracker, open_tracker

    out = out or sys.stdout
    if not Path(pairs_file).is_file():
        raise BadInput(f"{pairs_file}: no such file")
    ranks = Ranks.from_env(settings)
    tracker = Tracker([], "", {})
    if ranks.leader and settings.report_to:
        cache_dir = cache_dir if cache_dir is not None else CommonSettings().cache_dir
        tracker = open_tracker(settings, store, cache_dir, recipe_settings(settings))
    clean = False
    try:
        if ranks.leader:
            remove_staging_leftovers(store)
        trainer = Trainer.open(model_dir, settings, store, ranks=ranks)
        versions = _train_file(trainer, pairs_file, store, settings, on_error, out if ranks.leader else None,
                               tracker)
        clean = True
    finally:
        tracker.close()
        ranks.close(clean)
    return versions


def _train_file(trainer, pairs_file: Path, store: Path, settings: TrainerSettings, on_error: str,
                out, tracker) -> list[dict]:
    """The windows of `train_pairs`; `out` None: a rank > 0, which trains its shards and writes nothing."""
    from tqdm import tqdm

    from trainer import metrics as M
    from trainer.retention import prune_store

    leader = out is not None
    loaded = load_pairs(pairs_file, trainer.policy.tokenizer, settings, on_error, trainer.policy.vocab_size,
                        skip_ids=set(trainer.state.trained_ids), report=leader)
    size, versions = settings.window_pairs, []
    windows = [loaded.pairs[i : i + size] for i in range(0, len(loaded.pairs), size)]
    for window in tqdm(windows, desc="odpo train", unit="window", disable=None if leader else True,
                       file=sys.stderr):
        result = trainer.train_window(window)
        if not result.publishable:
            why = "the weights went non-finite" if result.restored else \
                f"non-finite loss/gradient in all {result.skipped} steps"
            if leader:
                print(f"odpo: window of {len(window)} pairs not trained: {why}", file=sys.stderr)
            continue
        if not leader:
            trainer.follow_version([p.pair_id for p in window], result)
            continue
        ckpt = trainer.publish_version(store, [p.pair_id for p in window], result)
        prune_store(store, settings.keep_versions)
        tracker.log_window(ckpt.version, M.tracked_values(result, ckpt.version, trainer.state.pairs_trained))
        row = {"version": ckpt.version, "path": str(ckpt.path), "sha256": ckpt.sha256, "pairs": len(window),
               "steps": result.steps, "skipped_steps": result.skipped, "loss_first": result.loss_first,
               "loss": result.loss, "reward_margin": result.reward_margin,
               "reward_accuracy": result.reward_accuracy, "seconds": round(result.seconds, 3)}
        print(json.dumps(row), file=out, flush=True)
        versions.append(row)
    if leader:
        print(json.dumps({"summary": {"versions": len(versions), "pairs_trained": sum(v["pairs"] for v in versions),
                                      "skipped_lines": loaded.skipped, "version": trainer.version,
                                      "store": str(store)}}), file=out, flush=True)
    return versions

"""Dataset loaders: JSONL files to contract messages, for `odpo pairs load` and `odpo prompts load`.

Preference pairs, one JSON object per line, in the same two forms the
trainer's offline commands read (trainer/pairs_file.py), giving the same
pairs and ids, so a file loaded here and trained offline dedupes in the ledger:
- TRL's preference format `{"prompt": ..., "chosen": ..., "rejected": ...}`:
  a string prompt is a raw text prompt and a list of chat messages a chat;
  chosen/rejected are strings or a list holding one assistant message. An
  optional string `id` names the pair (default: the deterministic `pair_id`
  of its content). Pairs get policy version 0 and judge `jsonl`.
- a `PreferencePair` as on odpo.preferences (recognised by its `judge` key).

Prompts, one per line: `{"prompt": "..."}` or `{"prompt": [messages]}` (as
above), or a PromptEvent's own `messages` / `text`; optional `id` (default: a
hash of the prompt), `task` (verifier metadata) and `source`.

Other keys are ignored (datasets carry extra columns); blank lines are
skipped; every other line is checked and a bad one reported with its number.
Repeated ids in one file are kept once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import ValidationError

from core.bus import send, validation_message
from core.contracts import (
    DATASET_JUDGE,
    ChatMessage,
    PreferencePair,
    PromptEvent,
    _Message,
    pair_id,
)

SOURCE = "jsonl"


@dataclass
class Loaded:
    """What a file held: valid messages with their Kafka keys (prompt ids), bad lines, repeats skipped."""

    messages: list[tuple[str, _Message]] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0


def _prompt(value: Any, given_id: Any = None, task: Any = None, source: Any = None) -> PromptEvent:
    if isinstance(value, str):
        form: dict[str, Any] = {"text": value}
    elif isinstance(value, list):
        form = {"messages": [ChatMessage.model_validate(m) for m in value]}
    else:
        raise ValueError("`prompt` must be a string or a list of chat messages")
    if given_id is not None and (not isinstance(given_id, str) or not given_id):
        raise ValueError("`id` must be a non-empty string")
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return PromptEvent(id=given_id or f"{SOURCE}-{digest}", task=task if task is not None else {},
                       source=source if source is not None else SOURCE, **form)


def _completion(value: Any, side: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise ValueError(f"`{side}` must be a string or a list with one assistant message")


def pair_from_line(record: dict[str, Any]) -> PreferencePair:
    if "judge" in record:
        return PreferencePair.model_validate(record)
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)} (expected prompt, chosen, rejected)")
    prompt = _prompt(record["prompt"])
    chosen, rejected = _completion(record["chosen"], "chosen"), _completion(record["rejected"], "rejected")
    given = record.get("id")
    if given is not None and (not isinstance(given, str) or not given):
        raise ValueError("`id` must be a non-empty string")
    return PreferencePair(id=given or pair_id(prompt.id, chosen, rejected, 0), prompt=prompt, chosen=chosen,
                          rejected=rejected, policy_version=0, judge=DATASET_JUDGE)


def prompt_from_line(record: dict[str, Any]) -> PromptEvent:
    forms = [k for k in ("prompt", "messages", "text") if k in record]
    if len(forms) != 1:
        raise ValueError("give exactly one of `prompt`, `messages` or `text`")
    if forms[0] == "text" and not isinstance(record["text"], str):
        raise ValueError("`text` must be a string")
    if forms[0] == "messages" and not isinstance(record["messages"], list):
        raise ValueError("`messages` must be a list of chat messages")
    return _prompt(record[forms[0]], record.get("id"), record.get("task"), record.get("source"))


def parse_lines(lines: Iterable[str], parse: Callable[[dict[str, Any]], _Message]) -> Loaded:
    """Check every line; valid messages keyed by prompt id, repeated ids kept once."""
    out, seen = Loaded(), set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            message = parse(record)
        except json.JSONDecodeError as exc:
            out.errors.append((number, f"not JSON ({exc.msg} at column {exc.colno})"))
            continue
        except ValidationError as exc:
            out.errors.append((number, validation_message(exc)))
            continue
        except (ValueError, TypeError) as exc:
            out.errors.append((number, str(exc)))
            continue
        if message.id in seen:
            out.duplicates += 1
            continue
        seen.add(message.id)
        out.messages.append((message.prompt.id if isinstance(message, PreferencePair) else message.id, message))
    return out


PARSERS: dict[str, Callable[[dict[str, Any]], _Message]] = {"pairs": pair_from_line, "prompts": prompt_from_line}


def load_file(path: Path, kind: str) -> Loaded:
    """Parse a JSONL file of `kind` ("pairs" or "prompts"); OSError/UnicodeDecodeError when unreadable."""
    with open(path, encoding="utf-8") as f:
        return parse_lines(f, PARSERS[kind])


class LoadError(Exception):
    """The file cannot be loaded as asked (the CLI reports it in one line, exit code 2)."""


MAX_REPORTED = 20


def load_and_publish(path: Path, kind: str, bootstrap: str, on_error: str = "stop", report=print) -> str:
    """Check every line of `path`, then publish the valid messages of `kind` onto their topic.

    Bad lines are reported (`report`, one line each, the first MAX_REPORTED);
    with `on_error="stop"` any bad line means nothing is published. Returns a
    one-line summary; raises `LoadError`.
    """
    from kafka.errors import KafkaError

    from core.bus import ensure_topics, make_producer
    from core.contracts import TOPIC_PREFERENCES, TOPIC_PROMPTS
    from core.topics import topic_name

    topic = topic_name({"pairs": TOPIC_PREFERENCES, "prompts": TOPIC_PROMPTS}[kind])
    try:
        loaded = load_file(path, kind)
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read {path}: {exc}") from None
    for number, reason in loaded.errors[:MAX_REPORTED]:
        report(f"{path}:{number}: {reason}")
    if len(loaded.errors) > MAX_REPORTED:
        report(f"{path}: ... and {len(loaded.errors) - MAX_REPORTED} more bad lines")
    if loaded.errors and on_error == "stop":
        raise LoadError(f"{len(loaded.errors)} bad line(s) in {path}; nothing was published "
                        f"(--on-error skip publishes the valid ones)")
    if not loaded.messages:
        raise LoadError(f"no valid {kind} in {path}")
    try:
        ensure_topics(bootstrap, [topic])
        producer = make_producer(bootstrap)
        try:
            futures = [send(producer, topic, key, m.to_bytes()) for key, m in loaded.messages]
            producer.flush()
            for f in futures:
                f.get(timeout=30)
        finally:
            producer.close()
    except KafkaError as exc:
        raise LoadError(f"cannot publish to the broker at {bootstrap}: {type(exc).__name__}: {exc}") from None
    notes = [f"{loaded.duplicates} repeated id(s) skipped"] if loaded.duplicates else []
    notes += [f"{len(loaded.errors)} bad line(s) skipped"] if loaded.errors else []
    return f"published {len(loaded.messages)} {kind} to {topic}" + (f" ({', '.join(notes)})" if notes else "")

"""What the gateway served: the prompt and text of each response, kept (LRU) so feedback can become pairs.

A response id is the `id` the engine gave the completion; choice `i` of a
response with several choices is `<id>:<i>` (`<id>` alone is choice 0).
Also turns client requests into `PromptEvent`s (for feedback and mirroring)
and reads the text of streamed responses as they pass through.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from core.contracts import ChatMessage, PromptEvent, ServedResponse
from service.gateway.metrics import SERVED_KEPT
from service.gateway.protocol import ChatCompletionRequest, CompletionRequest

MIRROR_SOURCE = "gateway"


@dataclass(frozen=True)
class ServedChoice:
    prompt: PromptEvent | None  # None when the request cannot be a PromptEvent (e.g. it ends with an assistant turn)
    text: str
    policy_version: int

    def response(self, response_id: str) -> ServedResponse:
        return ServedResponse(id=response_id, text=self.text, policy_version=self.policy_version)


def split_response_id(response_id: str) -> tuple[str, int]:
    base, sep, index = response_id.rpartition(":")
    if sep and index.isdigit() and base:
        return base, int(index)
    return response_id, 0


class ServedStore:
    """The last `capacity` responses (all their choices), least recently served dropped first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, list[ServedChoice]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, choices: list[ServedChoice]) -> None:
        if not response_id or not choices:
            return
        with self._lock:
            self._items[response_id] = choices
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            SERVED_KEPT.set(len(self._items))

    def get(self, response_id: str) -> ServedChoice | None:
        base, index = split_response_id(response_id)
        with self._lock:
            choices = self._items.get(base)
            if choices is None and base != response_id:  # an engine id that itself ends in ":<digits>"
                choices, index = self._items.get(response_id), 0
            return choices[index] if choices is not None and index < len(choices) else None

    def __len__(self) -> int:
        return len(self._items)


def new_prompt_id() -> str:
    return f"gw-{uuid.uuid4().hex[:24]}"


def chat_prompt(body: ChatCompletionRequest, prompt_id: str) -> PromptEvent | None:
    """The chat request as a PromptEvent, or None if it cannot be one (empty turns, no final user turn)."""
    try:
        return PromptEvent(id=prompt_id, source=MIRROR_SOURCE,
                           messages=[ChatMessage(role=m.role, content=m.text()) for m in body.messages])
    except ValidationError:
        return None


def completion_prompts(body: CompletionRequest, prompt_id: str) -> list[PromptEvent | None]:
    """One PromptEvent per prompt of a completion request (None for a blank one)."""
    texts = body.prompts()
    out: list[PromptEvent | None] = []
    for i, text in enumerate(texts):
        pid = prompt_id if len(texts) == 1 else f"{prompt_id}-{i}"
        try:
            out.append(PromptEvent(id=pid, text=text, source=MIRROR_SOURCE))
        except ValidationError:
            out.append(None)
    return out


def choices_of(payload: dict, chat: bool) -> dict[int, str]:
    """Texts of a non-streamed response by choice index."""
    texts: dict[int, str] = {}
    for ch in payload.get("choices") or []:
        if not isinstance(ch, dict) or not isinstance(ch.get("index"), int):
            continue
        text = (ch.get("message") or {}).get("content") if chat else ch.get("text")
        texts[ch["index"]] = text if isinstance(text, str) else ""
    return texts


class StreamTap:
    """Reads server-sent events as they are relayed and collects the response id and each choice's text."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.response_id: str | None = None
        self.done = False  # the `[DONE]` event was seen: the answer is complete
        self._parts: dict[int, list[str]] = {}
        self._buf = b""

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.done = True
        if not data or data == b"[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("id"), str):
            self.response_id = obj["id"]
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict) or not isinstance(ch.get("index"), int):
                continue
            piece = (ch.get("delta") or {}).get("content") if self.chat else ch.get("text")
            if isinstance(piece, str):
                self._parts.setdefault(ch["index"], []).append(piece)
            else:
                self._parts.setdefault(ch["index"], [])

    def texts(self) -> dict[int, str]:
        return {i: "".join(p) for i, p in self._parts.items()}


def served_choices(texts: dict[int, str], prompts: list[PromptEvent | None], per_prompt: int,
                   version: int) -> list[ServedChoice]:
    """Choices in index order; choice i answered prompt i // n (OpenAI's order for batched prompts)."""
    if not texts:
        return []
    out = []
    for i in range(max(texts) + 1):
        p = i // per_prompt
        out.append(ServedChoice(prompts[p] if p < len(prompts) else None, texts.get(i, ""), version))
    return out

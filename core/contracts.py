"""Messages that travel between components, one pydantic model per topic.

Every message is the JSON of one of these models and carries `schema_version`.
Keys on Kafka are the prompt id, so one prompt's events stay on one partition.
Components never share anything else than these models and the adapter store.

The `TOPIC_*` names are base names: a component reads and writes
`core.topics.topic_name(TOPIC_...)`, the deployment's topic prefix + the base name.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Annotated, Any, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

TOPIC_PROMPTS = "odpo.prompts"
TOPIC_CANDIDATES = "odpo.candidates"
TOPIC_PREFERENCES = "odpo.preferences"
TOPIC_ADAPTERS = "odpo.adapters"
TOPIC_FEEDBACK = "odpo.feedback"
TOPIC_DLQ = "odpo.dlq"
# The gate's decisions: the policy registry, written by the gate, read by every gateway replica (compacted, one
# partition; service/registry/control_log.py).
TOPIC_CONTROL = "odpo.control"
# What any gateway replica served and kept for feedback, keyed by response id, read by every replica
# (service/gateway/served_log.py); deleted by age (the gateway's `served_retention_s`).
TOPIC_SERVED = "odpo.served"
# `odpo dlq replay`'s record of the dead letters it replayed (service/dlq.py): compacted, one partition, created by
# the command (not by ensure_topics' default list: the loop never reads it).
TOPIC_DLQ_REPLAYED = "odpo.dlq.replayed"
ALL_TOPICS = (TOPIC_PROMPTS, TOPIC_CANDIDATES, TOPIC_PREFERENCES, TOPIC_ADAPTERS, TOPIC_FEEDBACK, TOPIC_DLQ,
              TOPIC_CONTROL, TOPIC_SERVED)

BASE_MODEL_NAME = "base"
POLICY_ALIAS = "policy"
_VERSION_NAME = re.compile(r"^policy-v([1-9][0-9]*)$")

TokenIds = list[Annotated[int, Field(ge=0)]]

# A `regex` task's pattern (judge/rules.py) comes from whoever wrote the prompt; the judge runs it with a time
# limit, and a prompt carrying a longer or uncompilable one is refused where it is accepted (the gateway's 400,
# the generator's DLQ).
MAX_REGEX_PATTERN_CHARS = 512


def version_name(version: int) -> str:
    """Served model name of a policy version: 0 is `base`, N is `policy-vN`."""
    if version < 0:
        raise ValueError(f"policy version must be >= 0, got {version}")
    return BASE_MODEL_NAME if version == 0 else f"policy-v{version}"


def parse_version_name(name: str) -> int | None:
    """Inverse of `version_name`; None for names that are not a policy version."""
    if name == BASE_MODEL_NAME:
        return 0
    m = _VERSION_NAME.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes):
        return cls.model_validate_json(raw)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class PromptEvent(_Message):
    """A prompt to sample from: chat messages or plain text, plus verifier metadata."""

    id: str = Field(min_length=1, max_length=200, description="Stable prompt id; the Kafka key.")
    messages: list[ChatMessage] | None = Field(default=None, description="Chat turns, ending with a user turn.")
    text: str | None = Field(default=None, description="Raw completion prompt, used when there are no messages.")
    task: dict[str, Any] = Field(default_factory=dict, description="Metadata a verifier judge needs (e.g. constraints).")
    source: str = Field(default="unknown", max_length=100, description="Who produced it: dataset, gateway, ...")

    @model_validator(mode="after")
    def _one_form(self) -> "PromptEvent":
        if (self.messages is None) == (self.text is None):
            raise ValueError("exactly one of `messages` or `text` must be given")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must be a user turn")
        if self.text is not None and not self.text.strip():
            raise ValueError("`text` must not be blank")
        if self.task.get("kind") == "regex":
            _check_pattern(self.task.get("pattern"))
        return self


def _check_pattern(pattern: Any) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a regex task's `pattern` must be a non-empty string")
    if len(pattern) > MAX_REGEX_PATTERN_CHARS:
        raise ValueError(f"a regex task's `pattern` may have at most {MAX_REGEX_PATTERN_CHARS} characters")
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"a regex task's `pattern` does not compile: {exc}") from None


class Completion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str
    token_ids: TokenIds = Field(min_length=1)
    logprobs: list[float] = Field(description="Log-probability of each sampled token under the sampling policy.")
    finish_reason: str | None = None

    @model_validator(mode="after")
    def _aligned(self) -> "Completion":
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} tokens")
        if any(lp > 1e-4 for lp in self.logprobs):
            raise ValueError("a log-probability must be <= 0")
        return self


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(ge=1)
    temperature: float = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    max_tokens: int = Field(ge=1)
    seed: int | None = None


class CandidateSet(_Message):
    """n sampled completions of one prompt, from one policy version."""

    prompt: PromptEvent
    prompt_token_ids: TokenIds = Field(min_length=1, description="The exact ids the server was prompted with.")
    completions: list[Completion] = Field(min_length=2)
    policy_version: int = Field(ge=0)
    sampling: SamplingParams
    created_at: float = Field(default_factory=time.time)


def pair_id(prompt_id: str, chosen: str, rejected: str, policy_version: int) -> str:
    """Deterministic pair id: the same judged pair always gets the same id (replays dedupe)."""
    blob = json.dumps([prompt_id, chosen, rejected, policy_version], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


DATASET_JUDGE = "jsonl"  # `PreferencePair.judge` of pairs loaded from a dataset (`odpo pairs load`): off-policy,
                        # sampled by no version of this policy, so version staleness does not describe them


class PreferencePair(_Message):
    """One preference: `chosen` is better than `rejected` for `prompt`."""

    id: str = Field(min_length=1, description="Deterministic pair id, see `pair_id`.")
    prompt: PromptEvent
    chosen: str
    rejected: str
    prompt_token_ids: TokenIds | None = Field(default=None, description="Set when the pair was sampled by the generator.")
    chosen_token_ids: TokenIds | None = None
    rejected_token_ids: TokenIds | None = None
    chosen_logprobs: list[float] | None = Field(default=None, description="Sampler logprobs of chosen tokens.")
    rejected_logprobs: list[float] | None = None
    policy_version: int = Field(ge=0, description="Version that sampled the pair (0 = base, or for offline data).")
    judge: str = Field(min_length=1)
    chosen_score: float | None = None
    rejected_score: float | None = None
    margin: float | None = None
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _consistent(self) -> "PreferencePair":
        if self.chosen == self.rejected and self.chosen_token_ids == self.rejected_token_ids:
            raise ValueError("chosen and rejected are identical")
        ids = (self.prompt_token_ids, self.chosen_token_ids, self.rejected_token_ids)
        if any(x is None for x in ids) and any(x is not None for x in ids):
            raise ValueError("prompt/chosen/rejected token ids must be given together or not at all")
        if self.prompt_token_ids is not None and not (self.chosen_token_ids and self.rejected_token_ids):
            raise ValueError("chosen and rejected token ids must not be empty")
        for side in ("chosen", "rejected"):
            lps, toks = getattr(self, f"{side}_logprobs"), getattr(self, f"{side}_token_ids")
            if lps is not None and (toks is None or len(lps) != len(toks)):
                raise ValueError(f"{side}_logprobs must align with {side}_token_ids")
        return self

    @property
    def has_token_ids(self) -> bool:
        return self.prompt_token_ids is not None


class TrainMetrics(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    loss: float
    reward_margin: float
    reward_accuracy: float
    steps: int = Field(ge=0)


class AdapterReady(_Message):
    """A new policy version is in the adapter store and may be served."""

    version: int = Field(ge=1)
    path: str = Field(min_length=1, description="Store-relative directory, e.g. `policy-v3`.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    base_model: str = Field(min_length=1, description="Name of the base model the adapter was trained on.")
    parent_version: int = Field(ge=0)
    pairs_trained: int = Field(ge=0)
    metrics: TrainMetrics
    created_at: float = Field(default_factory=time.time)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("path must be relative to the adapter store")
        return v

    @model_validator(mode="after")
    def _parent(self) -> "AdapterReady":
        if self.parent_version >= self.version:
            raise ValueError("parent_version must be older than version")
        return self


class ServedResponse(BaseModel):
    """A response the gateway served, as it kept it for feedback."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, description="The response id the client got.")
    text: str
    policy_version: int = Field(ge=0, description="Version that produced it.")


class Feedback(_Message):
    """A client's judgement of served responses: a rating of one, or a choice between two.

    The client sends ids only; the gateway fills `prompt`, `response` and
    `other_response` from the responses it served, so the judge can build pairs.
    """

    response_id: str = Field(min_length=1)
    rating: float | None = Field(default=None, ge=-1, le=1, description="-1 (bad) .. 1 (good).")
    other_response_id: str | None = Field(default=None, description="Set for a choice between two responses.")
    preferred: Literal["this", "other"] | None = None
    prompt: PromptEvent | None = Field(default=None, description="The prompt both responses answered.")
    response: ServedResponse | None = Field(default=None, description="The response `response_id` names.")
    other_response: ServedResponse | None = Field(default=None, description="The one `other_response_id` names.")
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_kind(self) -> "Feedback":
        is_choice = self.other_response_id is not None
        if is_choice == (self.rating is not None):
            raise ValueError("give either `rating` or `other_response_id` + `preferred`")
        if is_choice and self.preferred is None:
            raise ValueError("`preferred` is required with `other_response_id`")
        if self.response is not None and self.response.id != self.response_id:
            raise ValueError("`response.id` must equal `response_id`")
        if self.other_response is not None and self.other_response.id != self.other_response_id:
            raise ValueError("`other_response.id` must equal `other_response_id`")
        return self


class ServedText(BaseModel):
    """One choice of a served response: the prompt it answered, its text and the version that wrote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: PromptEvent | None = Field(description="None when the request cannot be a prompt (no final user turn).")
    text: str
    policy_version: int = Field(ge=0)


class ServedRecord(_Message):
    """A response a gateway replica served and kept for feedback, so any replica can take feedback on it."""

    id: str = Field(min_length=1, description="The response id the client got; the Kafka key.")
    choices: list[ServedText] = Field(min_length=1, description="By choice index (`<id>:<i>` names choice i).")
    served_at: float = Field(default_factory=time.time)
    replica: str = Field(min_length=1, description="The gateway replica that served it.")


class DeadLetter(_Message):
    """A message a consumer could not process, with why."""

    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    payload: str = Field(description="The raw message, decoded as UTF-8 with replacement.")
    error: str
    component: str
    created_at: float = Field(default_factory=time.time)


class DlqReplayed(_Message):
    """`odpo dlq replay` put a dead letter's record back on its topic (keyed by `record`, so it is done once)."""

    record: str = Field(min_length=1, description="Digest of the original record: source topic, partition, offset, "
                                                  "payload (service/dlq.py `record_digest`).")
    source_topic: str
    source_partition: int
    source_offset: int
    dlq_partition: int
    dlq_offset: int
    replayed_partition: int = Field(description="Where the replayed copy went on the source topic.")
    replayed_offset: int
    replayed_at: float = Field(default_factory=time.time)


TOPIC_MODELS: dict[str, type[_Message]] = {
    TOPIC_PROMPTS: PromptEvent,
    TOPIC_CANDIDATES: CandidateSet,
    TOPIC_PREFERENCES: PreferencePair,
    TOPIC_ADAPTERS: AdapterReady,
    TOPIC_FEEDBACK: Feedback,
    TOPIC_DLQ: DeadLetter,
    TOPIC_SERVED: ServedRecord,
    TOPIC_DLQ_REPLAYED: DlqReplayed,
}

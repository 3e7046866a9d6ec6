"""Settings: one pydantic-settings model per component.

Precedence, highest first: explicit arguments, environment (`ODPO_...`), the
YAML file named by `ODPO_CONFIG` (a mapping with one section per component:
`common`, `generator`, `judge`, `trainer`, `gateway`, `gate`), then the defaults here.
Unknown keys are errors (`extra="forbid"`; the config file's sections and keys are checked with the
closest name suggested), and the CLI refuses an ODPO_* variable that is no setting (`check_environment`),
so a typo never goes unnoticed.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, YamlConfigSettingsSource


SECTIONS = ("common", "generator", "judge", "trainer", "gateway", "gate")
# ODPO_* variables that are not settings: the config file's path, the store the generator hands its vLLM's LoRA
# resolver (generator/lora_resolver.py), the judge's default API-key variable (`llm_judge_api_key_env`) and
# odpo eval's API key of the engines it asks (service/cli.py).
OTHER_VARIABLES = {"ODPO_CONFIG", "ODPO_LORA_STORE", "ODPO_JUDGE_LLM_API_KEY", "ODPO_EVAL_API_KEY"}


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _config_file() -> dict[str, Any]:
    """The YAML file named by ODPO_CONFIG, checked: a mapping of known sections, each of known keys."""
    path = os.environ.get("ODPO_CONFIG")
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the config file ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the config file must be a mapping of sections")
    classes = {cls._section.default: cls for cls in _ComponentSettings.__subclasses__()}
    for section, data in loaded.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown section `{section}`{_closest(str(section), SECTIONS)}")
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ValueError(f"{path}: section `{section}` must be a mapping")
        fields = classes[section].model_fields
        for key in data:
            if key not in fields:
                raise ValueError(f"{path}: unknown key `{key}` in section `{section}`{_closest(str(key), fields)}")
    return loaded


class _YamlSection(YamlConfigSettingsSource):
    """This component's section of the YAML file named by ODPO_CONFIG (pydantic-settings' own YAML source),
    after `_config_file` checked every section and key."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        loaded = _config_file()
        path = os.environ.get("ODPO_CONFIG") if section in loaded and loaded[section] else None
        super().__init__(settings_cls, yaml_file=path, yaml_config_section=section if path else None)


def setting_names() -> dict[str, str]:
    """Every settings variable (ODPO_...) and the section.field it sets."""
    names = {}
    for cls in _ComponentSettings.__subclasses__():
        prefix = cls.model_config["env_prefix"]
        names.update({f"{prefix}{field}".upper(): f"{cls._section.default}.{field}" for field in cls.model_fields})
    return names


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Raise ValueError naming the first ODPO_* variable that is no setting (a typo is never ignored)."""
    environ = os.environ if environ is None else environ
    known = setting_names()
    for name in sorted(environ):
        if name.upper().startswith("ODPO_") and name.upper() not in known and name.upper() not in OTHER_VARIABLES:
            raise ValueError(f"unknown setting {name}{_closest(name.upper(), known)}")


class _ComponentSettings(BaseSettings):
    _section: str = ""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlSection(settings_cls, cls._section.default), file_secret_settings)


class CommonSettings(_ComponentSettings):
    """Settings every component reads."""

    model_config = SettingsConfigDict(env_prefix="ODPO_", extra="forbid")
    _section = "common"

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    store_dir: Path = Field(default=Path("~/.cache/odpo/adapters"), description="Adapter store: policy-v<N>/ folders.")
    cache_dir: Path = Field(default=Path("~/.cache/odpo"), description="Where the converted base model is cached.")
    base_model: Path | None = Field(default=None, description="A local HF model folder; default: the packaged SmolLM2-135M.")
    log_level: str = Field(default="INFO", description="Python logging level of every component.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text, or one JSON object per line (ts, level, logger, message, "
                                    "component; the gateway's access log adds request_id, method, path, status, "
                                    "duration_ms, model).")
    metrics_host: str = Field(default="127.0.0.1", description="Address /metrics listens on (0.0.0.0 in a pod).")
    task_curriculum: Literal["basic", "formats", "mixed"] = Field(
        default="mixed", description="The bundled task `odpo up` feeds and the gate and `odpo eval` score on: "
                                     "basic constraints, the format families, or both in turn (service/task.py).")
    message_key: SecretStr | None = Field(
        default=None, description="Key(s) that sign and check every message between components (core/signing.py): "
        "`<id>:<secret>` entries (secret of 16+ bytes) separated by commas; every listed key is accepted, the first "
        "signs. With a key, a record on odpo.prompts, .candidates, .preferences, .adapters, .feedback or .control "
        "without a valid `odpo-sig` header is dead-lettered (skipped on odpo.control). None (and no key file): "
        "nothing is signed or checked. `odpo up` generates one per run when neither is set.")
    message_key_file: Path | None = Field(
        default=None, description="A file holding `message_key`'s entries, one per line (a mounted Kubernetes "
                                  "Secret); read at start. Not together with message_key.")

    @model_validator(mode="after")
    def _usable_keys(self) -> "CommonSettings":
        from core.message_keys import keys_from

        keys_from(self.message_key.get_secret_value() if self.message_key is not None else None,
                  self.message_key_file)  # a key that cannot be used is a settings error (exit 2), not a crash later
        return self
    # Kafka names and shape (core/topics.py): every topic a component reads or writes, and every consumer group,
    # is `topic_prefix` + its base name; `core.bus.ensure_topics` creates the topics this way.
    topic_prefix: str = Field(
        default="", max_length=200, pattern=r"^[A-Za-z0-9._-]*$",
        description="Prefix of every topic and consumer group name, so deployments share a Kafka cluster without "
                    "sharing a message or a group: `team-a.` makes `team-a.odpo.prompts` and the group "
                    "`team-a.odpo-generator` (empty: `odpo.prompts`, `odpo-generator`). Letters, digits, `.`, `_`, "
                    "`-`. Every component of a deployment needs the same one.")
    topic_partitions: int = Field(
        default=1, ge=1, le=1000,
        description="Partitions of the topics odpo creates that consumer groups share (odpo.prompts, "
                    ".candidates, .preferences, .feedback, .served, .dlq); odpo.control and odpo.adapters always "
                    "get one. A topic that exists already is left as it is.")
    topic_replication_factor: int = Field(
        default=1, ge=1, le=32,
        description="Replicas of every topic odpo creates (at most the number of brokers; 3 on a production "
                    "cluster). A topic that exists already is left as it is.")
    # Kafka security: every producer, consumer and admin client of every component takes these
    # (core/bus.py, `kafka_security`).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How every Kafka client talks to the brokers: PLAINTEXT (no TLS, no "
                                         "login), SSL (TLS), SASL_PLAINTEXT (login, no TLS), SASL_SSL (both).")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="PLAIN", description="SASL mechanism with SASL_PLAINTEXT or SASL_SSL.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name (SASL_* protocols).")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password (SASL_* protocols).")
    kafka_sasl_password_file: Path | None = Field(
        default=None, description="File holding the SASL password (a Kubernetes Secret mount), read at start.")
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle (PEM) the brokers' certificates are checked against (SSL, "
                                  "SASL_SSL); unset: the system's CAs.")
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="Client certificate (PEM) for brokers that ask for one (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Private key (PEM) of `kafka_ssl_certfile`.")

    def model_post_init(self, __context: Any) -> None:
        self.store_dir = self.store_dir.expanduser()
        self.cache_dir = self.cache_dir.expanduser()
        if self.base_model is not None:
            self.base_model = self.base_model.expanduser()

    @model_validator(mode="after")
    def _kafka_security(self) -> "CommonSettings":
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            raise ValueError("set kafka_sasl_password or kafka_sasl_password_file, not both")
        if self.kafka_security_protocol.startswith("SASL_") and (
                not self.kafka_sasl_username or (self.kafka_sasl_password is None
                                                 and self.kafka_sasl_password_file is None)):
            raise ValueError(f"kafka_security_protocol {self.kafka_security_protocol} needs kafka_sasl_username "
                             "and kafka_sasl_password (or kafka_sasl_password_file)")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile go together")
        return self


def secret_value(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret given inline or as a file (a Kubernetes Secret mount, read now; surrounding whitespace
    stripped); None when neither is set. An unreadable or empty file is an error, never "no secret"."""
    if file is not None:
        text = Path(file).expanduser().read_text().strip()
        if not text:
            raise ValueError(f"{file} is empty")
        return text
    return value.get_secret_value() if value is not None else None


class _ServingEngines(BaseModel):
    """Where the vLLM engines are, for the components that route to them (the gateway) or score through them
    (the gate)."""

    vllm_url: str = Field(
        default="http://127.0.0.1:8100", description="The serving engine: the generator's vLLM, or several vLLM "
        "replicas as comma-separated URLs (requests go round-robin; a version becomes `policy` only when every "
        "one serves it).")
    vllm_resolve_dns: bool = Field(
        default=False, description="Each host name in `vllm_url` stands for all of its addresses, re-read every "
        "10 s (a Kubernetes headless Service of the generator pods).")
    engine_down_s: float = Field(
        default=5, gt=0, description="How long an engine that refused a connection is skipped before it is "
        "tried again.")
    models_refresh_s: float = Field(default=1.0, gt=0, description="How often loaded versions are re-read from vLLM.")
    request_timeout_s: float = Field(default=300, description="Timeout of one request to an engine.")


class _VllmClient(BaseModel):
    """The API key a component sends to vLLM (`Authorization: Bearer`); vLLM checks it on /v1/* when the
    generator started it with one (`ODPO_GENERATOR_VLLM_API_KEY`)."""

    vllm_api_key: SecretStr | None = Field(
        default=None, description="vLLM's API key, sent as `Authorization: Bearer` (unset: none is sent).")
    vllm_api_key_file: Path | None = Field(
        default=None, description="File holding vLLM's API key (a Kubernetes Secret mount), read at start.")

    @model_validator(mode="after")
    def _one_key(self):
        if self.vllm_api_key is not None and self.vllm_api_key_file is not None:
            raise ValueError("set vllm_api_key or vllm_api_key_file, not both")
        return self

    def vllm_key(self) -> str | None:
        """The key (read from its file now), or None."""
        return secret_value(self.vllm_api_key, self.vllm_api_key_file)

    def vllm_headers(self) -> dict[str, str]:
        """Headers of every request to vLLM: the bearer key when one is set."""
        key = self.vllm_key()
        return {"Authorization": f"Bearer {key}"} if key else {}


class GeneratorSettings(_ComponentSettings, _VllmClient):
    """vLLM serving and sampling of the live policy."""

    model_config = SettingsConfigDict(env_prefix="ODPO_GENERATOR_", extra="forbid")
    _section = "generator"

    vllm_url: str | None = Field(default=None, description="Use this running vLLM server instead of starting one.")
    vllm_host: str = Field(default="127.0.0.1", description="Address the started vLLM server listens on.")
    vllm_port: int = Field(default=8100, description="Port of the started vLLM server (0 = pick a free one).")
    dtype: str = Field(default="float32", description="vLLM --dtype; float32 matches HF numerics on CPU.")
    max_lora_rank: int = Field(default=8, description="vLLM --max-lora-rank; must cover the trainer's LoRA r.")
    max_loras: int = Field(default=4, ge=1, description="vLLM --max-loras: adapters that may share one batch.")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="vLLM --max-cpu-loras: adapters vLLM keeps in memory, least recently used "
        "out first (None = 2 x max_loras; at least max_loras). Room above max_loras lets a load between engine "
        "steps push out an idle adapter rather than one the running batch uses (that one is read from disk again).")
    max_model_len: int = Field(default=2048, description="vLLM --max-model-len.")
    kv_cache_gib: int = Field(default=2, description="VLLM_CPU_KVCACHE_SPACE on the CPU build, in GiB.")
    gpu_memory_utilization: float = Field(default=0.85, description="vLLM --gpu-memory-utilization (GPU build only).")
    cpu_threads_bind: str = Field(
        default="auto", min_length=1,
        description="VLLM_CPU_OMP_THREADS_BIND (CPU build): `auto` gives vLLM's compute one thread per physical "
                    "core except `cpu_reserved_cores` (on 2 cores: compute on one, the other left to the API server "
                    "and a trainer running with threads=1); a core list such as `1` or `2-7` pins the compute "
                    "there so a trainer can own the rest; `nobind` leaves placement to the OS. Do not give it every "
                    "core of a busy box: binding both cores of a 2-core machine measured 2-3x slower.")
    cpu_reserved_cores: int | None = Field(
        default=None, ge=0,
        description="VLLM_CPU_NUM_OF_RESERVED_CPU (CPU build): cores `auto` keeps free of vLLM's compute "
                    "(None = vLLM's default, one per worker).")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server arguments, passed verbatim.")
    startup_timeout_s: float = Field(default=600, description="How long to wait for vLLM to become healthy.")
    n: int = Field(default=4, ge=2, description="Samples per prompt.")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=48, ge=1, description="Most new tokens per sample.")
    seed: int | None = Field(default=None, description="Per-request sampling seed (None = vLLM's own randomness).")
    max_in_flight: int = Field(default=8, ge=1, description="Prompts being sampled at once (back-pressure bound).")
    restart_server: bool = Field(
        default=True, description="Restart a vLLM server (or engine) that died inside the generator; off: the "
        "generator exits instead, so its supervisor (`odpo up`) restarts and counts it.")
    store_check_s: float = Field(
        default=15, gt=0, description="How often to look in the adapter store for a version newer than the one "
        "served (the store is the record of versions; odpo.adapters is the fast path and can lose messages).")
    request_timeout_s: float = Field(default=300, description="Timeout of one sampling request.")
    max_request_attempts: int = Field(
        default=3, ge=1, description="Tries of a prompt that vLLM answers with a server error before it is "
                                     "dead-lettered (an unreachable server is waited for, not counted).")
    group_id: str = Field(default="odpo-generator", description="Consumer group on odpo.prompts.")
    log_file: Path | None = Field(default=None, description="vLLM's log; default <cache_dir>/logs/vllm-<pid>.log.")
    metrics_port: int = Field(default=0, description="Port of the generator's /metrics (0 = pick a free one).")


class JudgeSettings(_ComponentSettings):
    """Scoring candidates and building preference pairs."""

    model_config = SettingsConfigDict(env_prefix="ODPO_JUDGE_", extra="forbid")
    _section = "judge"

    judge: Literal["verifier", "reward_model", "llm_judge", "human"] = Field(
        default="verifier",
        description="Judge plugin: `verifier` (rule checks from the prompt's task), `reward_model` (a local HF "
                    "sequence classifier), `llm_judge` (pairwise LLM over an OpenAI-compatible endpoint) score "
                    "odpo.candidates; `human` turns odpo.feedback into pairs instead.")
    composition: Literal["product", "weighted", "rules_only"] = Field(
        default="product",
        description="How the plugin's score meets the quality guard (judge/composite.py): `product` = score x "
                    "(1 - w + w x quality), `weighted` = (1 - w) x score + w x quality, `rules_only` = the plugin "
                    "alone, no guard (the loop then learns the cheapest text its rules accept). Under product and "
                    "weighted, an answer the guard fails scores -1 and is never a pair's chosen side.")
    quality_weight: float = Field(default=0.25, ge=0, le=1, description="w of the composition: the share of the "
                                                                         "score the soft quality decides.")
    guard_min_words: int = Field(default=5, ge=1, description="Answers with fewer words fail the guard (too_short).")
    guard_max_word_share: float = Field(default=0.5, gt=0, le=1, description="An answer (4+ words) whose most "
                                                                              "frequent word is more than this "
                                                                              "share fails (repetitive).")
    guard_min_distinct2: float = Field(default=0.5, ge=0, le=1, description="An answer (8+ words) with fewer "
                                                                             "distinct bigrams than this share "
                                                                             "fails (repetitive).")
    guard_off_topic: bool = Field(default=True, description="Fail answers that name none of their task's topic "
                                                            "words (tasks with an on_topic constraint).")
    reference_logprob: bool = Field(default=True, description="Score fluency with the base model's log-"
                                                              "probability per token of each answer (loads the "
                                                              "base model in the judge, CPU or CUDA).")
    guard_min_ref_logprob: float = Field(default=-4.0, description="Answers below this reference log-prob per "
                                                                   "token fail (disfluent); also quality 0.")
    guard_good_ref_logprob: float = Field(default=-1.0, description="Reference log-prob per token of quality 1 "
                                                                    "(linear in between).")
    reference_threads: int = Field(default=1, ge=1, description="torch threads of the reference model on CPU.")
    collapse_guard: Literal["off", "drop", "penalize"] = Field(
        default="penalize", description="Against pairs won by being short (the mirror of length_guard): `drop` "
                                        "drops pairs whose chosen has fewer than collapse_ratio x the rejected's "
                                        "words; `penalize` takes collapse_penalty per halving of the word count "
                                        "off the margin and drops pairs left under min_margin.")
    collapse_ratio: float = Field(default=0.5, gt=0, le=1, description="Chosen counts as collapsed below this "
                                                                        "share of the rejected's words.")
    collapse_penalty: float = Field(default=0.1, ge=0, description="Score units per halving of the chosen/"
                                                                    "rejected word ratio (`penalize`).")
    min_margin: float = Field(default=1e-6, ge=0, description="Pairs whose score gap is below this are dropped (reason `margin`).")
    repair_pairs: bool = Field(default=True, description="Also publish a repair pair per candidate set of a "
        "constraints task: the best answer with what an edit can meet of its prompt met (case, commas, layout, "
        "start/end phrases, ...; judge/repair.py) preferred over that answer as sampled, when the judge scores it "
        "higher. Small models rarely sample the formats asked for, so sampled pairs alone seldom teach them.")
    pairing: Literal["best_vs_worst", "all_pairs", "top_k"] = Field(
        default="best_vs_worst", description="Which pairs of a candidate set are considered: the best against the "
                                             "worst, every two, or each of the k best against each of the k worst.")
    pair_k: int = Field(default=1, ge=1, description="k of `pairing: top_k`.")
    max_pairs_per_prompt: int = Field(default=4, ge=1, description="Most pairs published per candidate set (widest margins kept).")
    length_guard: Literal["off", "drop", "penalize"] = Field(
        default="off", description="Against pairs won by length: `drop` drops pairs whose chosen is longer than its "
                                   "rejected (beyond length_tolerance); `penalize` takes length_penalty per doubling "
                                   "of length off the margin and drops pairs left under min_margin.")
    length_tolerance: float = Field(default=0.1, ge=0, description="Chosen counts as longer above (1 + this) x rejected characters.")
    length_penalty: float = Field(default=0.25, ge=0, description="Score units per doubling of the chosen/rejected length ratio (`penalize`).")
    seen_ids_cache: int = Field(default=100_000, ge=1, description="Pair ids remembered to drop replays (least recent forgotten).")
    retry_wait_s: float = Field(default=5.0, gt=0, description="Wait before judging a batch again when the judge is unavailable.")
    verifier_callables: list[str] = Field(
        default_factory=list, description="Modules whose functions `callable` tasks may name (pkg.mod:fn); empty = "
                                          "the callable kind is off (a message must not pick code to run).")
    regex_timeout_s: float = Field(
        default=0.1, gt=0, le=10, description="Time limit of one `regex` task match on one answer (the `regex` "
        "library's timeout). A prompt's pattern comes from whoever wrote the prompt, and a catastrophic one would "
        "otherwise hang the judge on the same message after every restart; an answer whose match runs out of time "
        "scores 0, is logged once per pattern and counted (odpo_judge_regex_timeouts_total).")
    reward_model_path: Path | None = Field(default=None, description="Local HF sequence-classification folder (num_labels=1).")
    reward_model_device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the reward model runs (auto: CUDA when present).")
    reward_model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Reward model weights dtype.")
    reward_model_batch_size: int = Field(default=16, ge=1, description="Responses per reward-model forward pass.")
    reward_model_max_length: int = Field(default=1024, ge=8, description="Tokens kept per scored conversation (cut from the left).")
    reward_model_threads: int = Field(default=1, ge=1, description="torch threads for the reward model on CPU.")
    llm_judge_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI-compatible base URL (up to /v1) of the LLM judge.")
    llm_judge_model: str = Field(default="base", min_length=1, description="Model name the LLM judge asks for.")
    llm_judge_api_key_env: str | None = Field(
        default="ODPO_JUDGE_LLM_API_KEY", description="Environment variable holding the endpoint's API key (unset = none sent).")
    llm_judge_template: str = Field(
        default=("Here is a request and two answers to it.\n\nRequest: {prompt}\n\nAnswer A: {a}\n\n"
                 "Answer B: {b}\n\nWhich answer follows the request better? Reply with only the letter A or B."),
        description="User message to the LLM judge; {prompt}, {a} and {b} are filled in (other braces doubled).")
    llm_judge_system: str | None = Field(default=None, description="Optional system message for the LLM judge.")
    llm_judge_verdict_regex: str = Field(
        default=r"\b([AB])\b", description="Regex whose first group (A or B) is the verdict, first match in the reply.")
    llm_judge_max_tokens: int = Field(default=8, ge=1, description="Most tokens of one verdict reply.")
    llm_judge_timeout_s: float = Field(default=60, gt=0, description="Timeout of one LLM-judge request.")
    llm_judge_retries: int = Field(default=3, ge=0, description="Retries of a failed LLM-judge request (exponential backoff).")
    llm_judge_backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each retry.")
    llm_judge_concurrency: int = Field(default=4, ge=1, description="LLM-judge requests in flight per candidate set.")
    feedback_group_id: str = Field(default="odpo-judge-feedback", min_length=1, description="Kafka consumer group on odpo.feedback (judge=human).")
    feedback_max_prompts: int = Field(default=10_000, ge=1, description="Prompts whose ratings wait for an opposite rating.")
    feedback_max_per_prompt: int = Field(default=8, ge=1, description="Ratings kept waiting per prompt.")
    feedback_max_age_s: float = Field(default=86_400, gt=0, description="A rating waits this long for an opposite one.")
    group_id: str = Field(default="odpo-judge", min_length=1, description="Kafka consumer group on odpo.candidates.")
    poll_timeout_s: float = Field(default=0.5, gt=0, description="Longest wait for candidates per poll (bounds stop latency).")
    max_batch_seconds: float = Field(
        default=5.0, gt=0, description="Judge a poll's events for at most this long, then commit what is done and "
                                       "poll again (the rest is read again next): the group evicts a consumer that "
                                       "does not poll within 10 s.")
    max_poll_records: int = Field(
        default=4, ge=1, description="Candidate sets (or feedback) per poll. A poll's sets must be judged within the "
                                     "consumer group's max poll interval (10 s), and the quality guard's reference "
                                     "model takes 0.3-2 s per set on a busy CPU; more per poll gets the judge "
                                     "evicted from its group and the batch judged again.")
    metrics_port: int = Field(default=0, description="Port of the judge's /metrics (0 = pick a free one).")

    @field_validator("llm_judge_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
            v.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"the template may only use {{prompt}}, {{a}} and {{b}} (double other braces): {exc}")
        if fields != {"prompt", "a", "b"}:
            raise ValueError("the template must use {prompt}, {a} and {b}")
        return v

    @field_validator("llm_judge_verdict_regex")
    @classmethod
    def _verdict_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"not a regex: {exc}") from None
        if groups < 1:
            raise ValueError("the verdict regex needs a group capturing A or B")
        return v


class TrainerSettings(_ComponentSettings):
    """Rolling LoRA DPO updates."""

    model_config = SettingsConfigDict(env_prefix="ODPO_TRAINER_", extra="forbid")
    _section = "trainer"

    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                       "apo_zero", "apo_down", "discopop"] = Field(
        default="sigmoid", description="DPO loss variant (trainer/losses/, same numbers as TRL 1.16's loss_type): "
                                       "sigmoid = DPO.")
    beta: float = Field(default=0.1, gt=0, description="DPO temperature beta (IPO's tau); the starting value "
                                                     "when kl_target adapts it.")
    kl_target: float = Field(
        default=0.1, ge=0, description="Drift budget: adapt beta after every window to keep the policy's measured "
                                       "KL from the reference near this many nats per token (trainer/kl_control.py); "
                                       "0 = a fixed beta.")
    beta_min: float = Field(default=0.05, gt=0, description="Lowest beta kl_target may set (a floor far below "
                                                            "beta lets the drift overshoot: the measurement lags).")
    beta_max: float = Field(default=2.0, gt=0, description="Highest beta kl_target may set.")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="Assumed label-flip probability: cDPO smoothing of sigmoid, the eps "
                                               "of robust, aot and exo_pair (which needs it > 0, e.g. 1e-3).")
    rpo_alpha: float = Field(default=0.0, ge=0, description="Weight of the chosen-NLL (SFT) term added to the loss "
                                                           "(RPO); 0 = off.")
    discopop_tau: float = Field(default=0.05, gt=0, description="Temperature tau of the discopop loss.")
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW peak learning rate of the LoRA weights.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="Learning-rate shape after warmup, over the global optimizer step.")
    warmup_steps: int = Field(default=0, ge=0, description="Optimizer steps of linear warmup from 0 to the peak.")
    decay_steps: int = Field(default=0, ge=0, description="Step at which linear/cosine decay reaches "
                                                         "min_lr_ratio x peak (then stays); must exceed warmup_steps.")
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="Floor of linear/cosine decay, x the peak.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of the LoRA weights.")
    window_pairs: int = Field(default=16, ge=1, description="Pairs per rolling update.")
    window_seconds: float = Field(default=0, ge=0, description="Also close a window after this long, if > 0 and non-empty.")
    steps_per_window: int = Field(default=4, ge=1, description="Optimizer steps over each window; each takes the "
                                                              "next step_pairs pairs, cycling through the window.")
    step_pairs: int = Field(default=0, ge=0, description="Pairs per optimizer step (0 = the whole window); the "
                                                        "gradient accumulates over micro-batches of batch_pairs.")
    batch_pairs: int = Field(default=8, ge=1, description="Pairs per forward/backward micro-batch.")
    forward_tokens: int = Field(default=0, ge=0, description="Most tokens in one packed forward (rows x longest "
                                                            "row); 0 = auto: one pair per forward on a CPU (no "
                                                            "padding), 16384 on a GPU.")
    shuffle: bool = Field(default=False, description="Visit a window's pairs in a seeded random order each pass "
                                                     "(default: arrival order, like TRL's sequential sampler).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto = bf16 autocast on a GPU that supports it, float32 on CPU (exact numbers).")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
    max_length: int = Field(default=512, ge=8, description="Prompt + completion tokens kept per sequence.")
    max_staleness: int = Field(default=4, ge=0, description="Drop pairs sampled more than this many versions behind.")
    stuck_consumer_s: float = Field(
        default=60, ge=0, description="Exit (so the supervisor restarts the trainer with a fresh consumer) when "
        "offset commits have failed for this long, e.g. a consumer stuck in a rebalance after the broker "
        "restarted; 0 = never.")
    stale_dataset_pairs: bool = Field(
        default=False, description="Apply max_staleness to pairs loaded from a dataset too (version 0, sampled by "
                                   "no version of this policy). Off: they are trained whenever they arrive.")
    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules that get LoRA."
    )
    seed: int = Field(default=0, description="Seed of the LoRA init and of `shuffle`.")
    threads: int = Field(default=1, ge=1, description="torch threads; 1 beside vLLM on a small CPU box.")
    group_id: str = Field(default="odpo-trainer", min_length=1, description="Kafka consumer group on odpo.preferences.")
    metrics_port: int = Field(default=0, description="Port of the trainer's /metrics (0 = pick a free one).")
    keep_versions: int = Field(
        default=5, ge=0, description="Store retention after each publish: keep the newest this many versions and "
        "every held one (gateway: promoted, pinned, rollback), delete the rest; 0 = keep all (trainer/retention.py).")
    archive_rotate_mb: float = Field(
        default=64, gt=0, description="Start a new file of the pair archive (<store>/pairs/) once one passes this "
        "many MiB (trainer/archive.py).")
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="Under torchrun (WORLD_SIZE > 1; trainer/distributed.py): ddp = every rank holds "
        "the whole model (DistributedDataParallel); fsdp = the frozen base model's weights are sharded over the "
        "ranks (FSDP2, for a model that does not fit one device), the LoRA weights stay whole on every rank. "
        "Ignored in a single process.")
    dist_timeout_s: float = Field(
        default=60, gt=0, description="Under torchrun: timeout of every collective (init_process_group's timeout). "
        "A rank waiting this long for a dead or hung peer raises and exits non-zero, so torchrun (or the "
        "supervisor) restarts the group; rank 0 sends a keepalive at least every quarter of it while idle.")
    report_to: Annotated[list[Literal["tensorboard", "mlflow", "wandb"]], NoDecode] = Field(
        default_factory=list, description="Experiment trackers that get every published window's metrics, named "
        "as on /metrics (trainer/tracking.py), with the version as the step, as TRL's report_to: any of "
        "tensorboard, mlflow, wandb, comma separated (or a YAML list); empty or `none` = none. Each needs its "
        "package (`pip install 'odpo[tracking]'` brings tensorboard; mlflow and wandb are installed by hand). "
        "A tracker that fails while running is logged once and never stops training.")
    tracking_dir: Path | None = Field(
        default=None, description="TensorBoard's log folder: event files go to <tracking_dir>/<tracking_run_name>/ "
        "(default <cache_dir>/runs).")
    tracking_run_name: str = Field(
        default="", description="The run's name: TensorBoard's subfolder, MLflow's run name, W&B's run name "
        "(default: the store folder's parent and name, e.g. `odpo-adapters`; a restarted trainer on the same "
        "store continues the same TensorBoard run).")
    mlflow_tracking_uri: str = Field(
        default="", description="MLflow tracking URI (report_to mlflow), e.g. http://mlflow:5000 or "
        "file:///data/mlruns; empty = MLflow's own default (MLFLOW_TRACKING_URI).")
    mlflow_experiment: str = Field(default="odpo", min_length=1, description="MLflow experiment of the runs.")
    wandb_project: str = Field(default="odpo", min_length=1, description="W&B project of the runs (report_to wandb).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        """`tensorboard,mlflow` (TRL's comma form, from the environment), a JSON list, or `none`."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            value = [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            value = [v for v in value if not (isinstance(v, str) and v.lower() == "none")]
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        import importlib.util

        for backend in dict.fromkeys(value):
            if importlib.util.find_spec(backend) is None:
                extra = " (or `pip install 'odpo[tracking]'`)" if backend == "tensorboard" else ""
                raise ValueError(f"report_to {backend} needs `pip install {backend}`{extra}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _consistent(self) -> "TrainerSettings":
        if self.loss_type == "exo_pair" and self.label_smoothing <= 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its eps; the paper uses 1e-3)")
        if self.lr_scheduler != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"lr_scheduler {self.lr_scheduler} needs decay_steps > warmup_steps")
        return self


class GatewaySettings(_ComponentSettings, _ServingEngines, _VllmClient):
    """The OpenAI-compatible front door: a stateless reader of the gate's decisions (any number of replicas)."""

    model_config = SettingsConfigDict(env_prefix="ODPO_GATEWAY_", extra="forbid")
    _section = "gateway"

    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8000, description="Listen port.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Serve /metrics on this port (on `metrics_host`; 0 = a free one) and not on the API port, so "
                    "the public Service carries the API only. Unset: /metrics on the API port.")
    served_capacity: int = Field(default=10_000, ge=1, description="Served responses kept for /v1/feedback (LRU).")
    served_retention_s: float = Field(
        default=7 * 24 * 3600, gt=0, description="How long a served response stays ratable through any replica "
        "and after restarts: the retention of odpo.served (set when a gateway creates it; older records are skipped).")
    max_tokens_cap: int = Field(
        default=1024, ge=1, description="Most new tokens per choice a client may ask for (`max_tokens`, "
                                        "`max_completion_tokens`); more is refused with 400, none asked means this "
                                        "many (or what the context leaves).")
    mirror_fraction: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of client prompts mirrored into odpo.prompts for learning "
                                             "(0 by default: the verifier judge can only score bundled-task prompts).")
    mirror_queue_size: int = Field(default=1000, ge=1, description="Mirrored prompts and served records (odpo.served) "
                                                                  "waiting for Kafka; more are dropped.")
    publish_timeout_s: float = Field(default=10, gt=0, description="Wait for Kafka on /v1/feedback and /v1/prompts.")
    broker_check_s: float = Field(default=5, gt=0, description="How long /readyz reuses a broker reachability check.")
    allow_prompt_logprobs: bool = Field(
        default=False, description="Forward completions with `echo` and `logprobs` (prompt log-probabilities). Off: "
                                   "vllm-cpu 0.32 with LoRA enabled kills its engine when two such requests share "
                                   "a batch (measured on this project's CPU build).")
    control_topic: str = Field(
        default="odpo.control", min_length=1,
        description="Compacted one-partition topic of the gate's decisions (a record per version, the head: "
                    "promoted version, history, pin); the gate writes it, every gateway replica reads it. The "
                    "common `topic_prefix` is put before it.")
    api_keys_file: Path | None = Field(
        default=None, description="Client API keys (JSON or YAML list of {id, key or sha256, scopes, rate_per_s, "
        "burst, daily_quota, feedback_per_hour, feedback_per_response}; README, Client credentials): every `/v1/*` "
        "request then needs `Authorization: Bearer <key>` with the route's scope. Re-read when the file changes "
        "(a rotated Kubernetes Secret applies without a restart). Unset: no keys (a local run on 127.0.0.1).")
    api_keys_check_s: float = Field(
        default=1.0, gt=0, description="How often the gateway looks whether `api_keys_file` changed.")
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body; more is refused with 413 (counted as it "
                                               "arrives, whatever Content-Length says).")
    prompt_task_kinds: list[str] = Field(
        default=["constraints"], description="Task kinds a client may give a prompt on /v1/prompts (the task is "
        "what the verifier judge rewards); others are refused with 400. Default: the bundled constraints.")
    unknown_model_cache_s: float = Field(
        default=2.0, ge=0, description="How long a `policy-v<N>` found in no engine and not announced is answered "
                                       "404 from memory, without looking in the store and the engines again.")
    serve_refused_versions: bool = Field(
        default=False, description="Serve versions the gate refused or an operator rolled back when a client names "
                                   "them (`policy-v<N>`). Off: 404; `policy` follows the gate either way.")


class GateSettings(_ComponentSettings, _ServingEngines, _VllmClient):
    # (the limit_* fields are the degeneration limits: service/gate/verdict.py)
    """The promotion gate: the one writer of the policy registry (scores, promoted version, pins, history)."""

    model_config = SettingsConfigDict(env_prefix="ODPO_GATE_", extra="forbid")
    _section = "gate"

    host: str = Field(default="127.0.0.1", description="Listen address of the admin API, /readyz and /metrics.")
    port: int = Field(default=8001, description="Listen port of the admin API, /readyz and /metrics.")

    admin_token: SecretStr | None = Field(default=None, description="Bearer token of the admin API (unset: admin off).")
    admin_token_file: Path | None = Field(
        default=None, description="File holding the admin token (a Kubernetes Secret mount); read on each request.")
    heldout_prompts: int = Field(default=48, ge=1, description="Held-out prompts a version is scored on first; "
                                                               "the gate scores more (doubling) while the "
                                                               "interval of the paired score difference is wider "
                                                               "than the tolerance.")
    heldout_prompts_max: int = Field(default=128, ge=1, description="Most held-out prompts a version is scored on "
                                                                    "(then the gate decides on what it has).")
    store_check_s: float = Field(
        default=15, gt=0, description="How often the gate looks in the adapter store for a version odpo.adapters "
        "did not bring (the store is the record of versions).")
    hold_history: int = Field(
        default=5, ge=0, description="Rollback depth kept from store retention: the promoted version and this "
        "many earlier promoted versions are held (`<store>/holds/gate.json`).")
    eval_max_tokens: int = Field(default=48, ge=1, description="Most new tokens per held-out answer.")
    eval_concurrency: int = Field(default=8, ge=1, description="Held-out requests in flight at once.")
    promotion_tolerance: float = Field(
        default=0.05, ge=0, description="Non-inferiority margin: a version is promoted unless the 95% interval of "
                                        "its paired held-out score difference against the promoted version reaches "
                                        "below -tolerance (and no quality signal degrades beyond its limit).")
    reference_logprob: bool = Field(
        default=True, description="The gate also scores the base model's log-probability per token of each "
                                  "held-out answer (loads the base model into the gate, CPU).")
    limit_mean_words: float = Field(default=0.35, ge=0, le=1, description="Refuse a version whose mean answer "
                                                                           "length (words) is below the promoted "
                                                                           "version's or base's by more than this "
                                                                           "share.")
    limit_empty_share: float = Field(default=0.05, ge=0, le=1, description="Refuse a version whose share of empty "
                                                                            "answers is higher by more than this.")
    limit_distinct2: float = Field(default=0.10, ge=0, le=1, description="Refuse a version whose distinct-2 "
                                                                          "(distinct word bigrams / bigrams) is "
                                                                          "lower by more than this.")
    limit_on_topic_share: float = Field(default=0.10, ge=0, le=1, description="Refuse a version whose share of "
                                                                               "answers naming their topic is "
                                                                               "lower by more than this.")
    limit_ref_logprob: float = Field(default=0.20, ge=0, description="Refuse a version whose mean reference "
                                                                      "log-prob per token is lower by more than "
                                                                      "this (nats).")
    limit_guard_pass: float = Field(default=0.10, ge=0, le=1, description="Refuse a version whose share of "
                                                                           "answers passing the judge's quality "
                                                                           "guard is lower by more than this.")
    load_wait_s: float = Field(
        default=30, ge=0, description="How long the gate waits for the generator to load a version before loading "
                                      "it into vLLM itself from the adapter store.")
    score_versions_kept: int = Field(default=8, ge=1, description="Versions whose held-out score /metrics exports.")
    persist_registry: bool = Field(
        default=True, description="Keep the policy registry (scores, promoted version, pin, rollback history) in "
                                  "`registry_file`, so a restart forgets no decision. Off: in memory only.")
    registry_file: Path | None = Field(
        default=None, description="The policy registry's file (default: gate-registry.json in the store).")
    control_topic: str = Field(
        default="odpo.control", min_length=1,
        description="Compacted one-partition topic of the gate's decisions (a record per version, the head: "
                    "promoted version, history, pin); the gate writes it, every gateway replica reads it. The "
                    "common `topic_prefix` is put before it.")

    @model_validator(mode="after")
    def _heldout_range(self) -> "GateSettings":
        if self.heldout_prompts_max < self.heldout_prompts:
            raise ValueError(f"heldout_prompts_max ({self.heldout_prompts_max}) is below heldout_prompts "
                             f"({self.heldout_prompts})")
        return self

    def gate_limits(self) -> dict[str, float]:
        """The degeneration limits by signal name (service/gate/verdict.py)."""
        return {name: getattr(self, f"limit_{name}") for name in
                ("mean_words", "empty_share", "distinct2", "on_topic_share", "ref_logprob", "guard_pass")}

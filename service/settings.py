"""Settings: one pydantic-settings model per component.

Precedence, highest first: explicit arguments, environment (`ODPO_...`), the
YAML file named by `ODPO_CONFIG` (a mapping with one section per component:
`common`, `generator`, `judge`, `trainer`, `gateway`), then the defaults here.
Unknown keys are errors (`extra="forbid"`), so a typo never goes unnoticed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _YamlSection(PydanticBaseSettingsSource):
    """Reads this component's section of the YAML file named by ODPO_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings], section: str):
        super().__init__(settings_cls)
        path = os.environ.get("ODPO_CONFIG")
        data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config file must be a mapping of sections")
            data = loaded.get(section) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: section `{section}` must be a mapping")
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


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
    metrics_host: str = Field(default="127.0.0.1", description="Address /metrics listens on (0.0.0.0 in a pod).")

    def model_post_init(self, __context: Any) -> None:
        self.store_dir = self.store_dir.expanduser()
        self.cache_dir = self.cache_dir.expanduser()
        if self.base_model is not None:
            self.base_model = self.base_model.expanduser()


class GeneratorSettings(_ComponentSettings):
    """vLLM serving and sampling of the live policy."""

    model_config = SettingsConfigDict(env_prefix="ODPO_GENERATOR_", extra="forbid")
    _section = "generator"

    vllm_url: str | None = Field(default=None, description="Use this running vLLM server instead of starting one.")
    vllm_host: str = Field(default="127.0.0.1", description="Address the started vLLM server listens on.")
    vllm_port: int = Field(default=8100, description="Port of the started vLLM server (0 = pick a free one).")
    dtype: str = Field(default="float32", description="vLLM --dtype; float32 matches HF numerics on CPU.")
    max_lora_rank: int = Field(default=8, description="vLLM --max-lora-rank; must cover the trainer's LoRA r.")
    max_loras: int = Field(default=4, description="vLLM --max-loras: adapters that may share one batch.")
    max_model_len: int = Field(default=2048, description="vLLM --max-model-len.")
    kv_cache_gib: int = Field(default=2, description="VLLM_CPU_KVCACHE_SPACE on the CPU build, in GiB.")
    gpu_memory_utilization: float = Field(default=0.85, description="vLLM --gpu-memory-utilization (GPU build only).")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server arguments, passed verbatim.")
    startup_timeout_s: float = Field(default=600, description="How long to wait for vLLM to become healthy.")
    n: int = Field(default=4, ge=2, description="Samples per prompt.")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=48, ge=1, description="Most new tokens per sample.")
    seed: int | None = Field(default=None, description="Per-request sampling seed (None = vLLM's own randomness).")
    max_in_flight: int = Field(default=8, ge=1, description="Prompts being sampled at once (back-pressure bound).")
    keep_versions: int = Field(default=2, ge=1, description="Policy versions kept loaded besides `base`.")
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

    judge: Literal["verifier"] = Field(default="verifier", description="Which judge plugin scores candidates.")
    min_margin: float = Field(default=1e-6, ge=0, description="Pairs whose score gap is below this are ties (dropped).")
    group_id: str = Field(default="odpo-judge", min_length=1, description="Kafka consumer group on odpo.candidates.")
    poll_timeout_s: float = Field(default=0.5, gt=0, description="Longest wait for candidates per poll (bounds stop latency).")
    metrics_port: int = Field(default=0, description="Port of the judge's /metrics (0 = pick a free one).")


class TrainerSettings(_ComponentSettings):
    """Rolling LoRA DPO updates."""

    model_config = SettingsConfigDict(env_prefix="ODPO_TRAINER_", extra="forbid")
    _section = "trainer"

    loss_type: Literal["sigmoid"] = Field(default="sigmoid", description="DPO loss variant.")
    beta: float = Field(default=0.1, gt=0, description="DPO temperature beta.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Assumed label-flip probability (cDPO).")
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay of the LoRA weights.")
    window_pairs: int = Field(default=16, ge=1, description="Pairs per rolling update.")
    window_seconds: float = Field(default=0, ge=0, description="Also close a window after this long, if > 0 and non-empty.")
    steps_per_window: int = Field(default=4, ge=1, description="Optimizer steps over each window.")
    batch_pairs: int = Field(default=8, ge=1, description="Pairs per forward/backward micro-batch.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient-norm clip.")
    max_length: int = Field(default=512, ge=8, description="Prompt + completion tokens kept per sequence.")
    max_staleness: int = Field(default=4, ge=0, description="Drop pairs sampled more than this many versions behind.")
    lora_r: int = Field(default=8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(default=16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Modules that get LoRA."
    )
    seed: int = Field(default=0, description="Seed of LoRA init and batching.")
    threads: int = Field(default=1, ge=1, description="torch threads; 1 beside vLLM on a small CPU box.")
    group_id: str = Field(default="odpo-trainer", min_length=1, description="Kafka consumer group on odpo.preferences.")
    metrics_port: int = Field(default=0, description="Port of the trainer's /metrics (0 = pick a free one).")


class GatewaySettings(_ComponentSettings):
    """The OpenAI-compatible front door."""

    model_config = SettingsConfigDict(env_prefix="ODPO_GATEWAY_", extra="forbid")
    _section = "gateway"

    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8000, description="Listen port.")
    vllm_url: str = Field(default="http://127.0.0.1:8100", description="The generator's vLLM server.")
    models_refresh_s: float = Field(default=1.0, gt=0, description="How often loaded versions are re-read from vLLM.")
    request_timeout_s: float = Field(default=300, description="Timeout of one forwarded request.")

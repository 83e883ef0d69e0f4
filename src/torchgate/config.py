"""Settings: one pydantic-settings class, read from `TORCHGATE_*` variables and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RATE_PATTERN = r"^\s*\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?\s*$"


class Settings(BaseSettings):
    """Everything an operator can set. Every field is `TORCHGATE_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TORCHGATE_", extra="ignore")

    # where and what to serve
    models: Path = Field(Path("models"), description="model repository directory")
    default_model: str | None = Field(None, description="model behind POST /predict")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: int = Field(0, ge=0, description="intra-op threads on CPU; 0 = from cores")
    gil_switch_ms: float = Field(
        0.25, gt=0, le=100, description="the interpreter's thread switch interval (GIL)"
    )

    # batching, overriding every model's [batching] when set
    max_delay_ms: float | None = Field(None, ge=0)
    max_queue_rows: int | None = Field(None, ge=1)
    batch_timeout_ms: float | None = Field(None, gt=0)

    # security
    auth: Literal["on", "off"] = "on"
    api_keys: str | None = Field(None, description="comma-separated plain keys, scope infer")
    api_keys_file: Path | None = None
    metrics_require_key: bool = False
    rate_limit: str = "100/minute"
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    max_inflight: int = Field(
        2048, ge=1, description="requests in the server at once, probes aside (503 past it)"
    )
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="request line and headers")
    max_headers: int = Field(100, ge=8, description="header fields in one request")
    max_text_length: int = Field(10_000, ge=1)
    max_tokens: int = Field(10_000, ge=1, description="ceiling on tokens per text, every model")
    deny_phrases: str | None = Field(None, description="comma-separated phrases to refuse")

    # shared state and resilience
    redis_url: str | None = None
    cache_ttl_s: float | None = Field(None, ge=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    breaker_min_callers: int = Field(
        3, ge=1, description="distinct callers before failures of the input's kind count"
    )
    drain_timeout_s: float = Field(30.0, gt=0)
    model_control: Literal["none", "explicit"] = "none"

    # residency: models loaded on demand within a memory budget (serving/residency.py)
    model_memory_bytes: int | None = Field(
        None, ge=1, description="host memory for models on the CPU; unset = no budget"
    )
    gpu_model_memory_bytes: int | None = Field(
        None, ge=1, description="memory for models on each GPU; unset = no budget"
    )
    load_backoff_s: float = Field(
        10.0, gt=0, description="wait after a failed on-demand load before the next try"
    )
    load_backoff_max_s: float = Field(
        300.0, gt=0, description="the back-off doubles per failure up to this"
    )
    concurrent_loads: int = Field(
        1, ge=1, le=64, description="model loads at once (each peaks at several times its size)"
    )
    sla_p99_ms: float = Field(500.0, gt=0, description="p99 latency objective for alerts")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("device must be cpu, cuda, cuda:N or auto")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        if value != "off" and not re.match(RATE_PATTERN, value):
            raise ValueError("rate_limit must read like '100/minute', '10 per second' or 'off'")
        return value

    def plain_api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_keys or "").split(",") if k.strip()]

    def deny_list(self) -> list[str]:
        return [p.strip() for p in (self.deny_phrases or "").split(",") if p.strip()]

"""Settings of the provider simulator; every field can change at runtime via POST /_sim/config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultKind = Literal["429", "500", "503", "529", "hang"]
LimiterShape = Literal["token-bucket", "rolling", "fixed"]


class SimConfig(BaseModel):
    """How the simulated providers behave. Limits of None mean unlimited."""

    # Typos in a runtime patch must fail loudly rather than silently do nothing.
    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(20.0, ge=0, description="mean added latency per call, ms")
    latency_jitter_ms: float = Field(0.0, ge=0, description="uniform +/- jitter around latency_ms, ms")
    first_chunk_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="streamed calls: the share of a call's latency before its first chunk (time to "
        "first token); the rest is spread evenly between its chunks, so a streamed call ends when "
        "the same call unstreamed would",
    )
    seed: int = Field(0, description="seed for answers, faults and jitter")
    rpm: int | None = Field(None, ge=1, description="OpenAI dialect: requests per minute")
    tpm: int | None = Field(None, ge=1, description="OpenAI dialect: tokens per minute")
    anthropic_rpm: int | None = Field(None, ge=1, description="Anthropic dialect: requests per minute")
    itpm: int | None = Field(None, ge=1, description="Anthropic dialect: input tokens per minute")
    otpm: int | None = Field(None, ge=1, description="Anthropic dialect: output tokens per minute")
    otpm_counts: Literal["max_tokens", "output"] = Field(
        "max_tokens",
        description="Anthropic dialect: what a call takes from OTPM when it arrives: its max_tokens, "
        "the unused part given back when it ends (Anthropic's documented way), or only the output "
        "it will really produce (a provider counting output as it is generated)",
    )
    limiter: LimiterShape = Field(
        "token-bucket",
        description="limiter shape: token-bucket (continuous refill), rolling (sliding window) or "
        "fixed (window opened by its first call); headrace/simulator/buckets.py",
    )
    window_s: float = Field(
        60.0, gt=0, description="the limiter's window (a token bucket's time to refill), s"
    )
    sub_window_s: float | None = Field(
        None, gt=0, description="a shorter window of the same shape enforced together with the first, s"
    )
    fault_rate: float = Field(0.0, ge=0, le=1, description="probability that an admitted call faults")
    faults: list[FaultKind] = Field(
        ["500", "503", "529"],
        min_length=1,
        description="fault kinds, chosen uniformly (comma-separated on the CLI)",
    )
    hang_s: float = Field(300.0, ge=0, description="how long a hang holds the connection before a 504, s")
    min_output_tokens: int = Field(5, ge=1, description="shortest natural answer, tokens")
    max_output_tokens: int = Field(60, ge=1, description="longest natural answer, tokens")
    require_api_key: bool = Field(True, description="answer 401 when no API key is sent")
    anthropic_cache_min_tokens: int = Field(
        1024,
        ge=0,
        description="Anthropic dialect: the shortest prompt prefix a cache_control breakpoint caches",
    )
    openai_cache_min_tokens: int = Field(
        1024,
        ge=1,
        description="OpenAI dialect: the shortest prompt cached automatically (then 128-token steps)",
    )
    prompt_cache_entries: int = Field(
        10_000, ge=0, description="prompt prefixes remembered (least recently used out first)"
    )
    echo_in_errors: bool = Field(
        False,
        description="error bodies echo the credential header and the last user message the call "
        "sent, as some providers' do: a test that logs never repeat what a provider says",
    )

    @model_validator(mode="after")
    def _check_output_range(self) -> SimConfig:
        if self.min_output_tokens > self.max_output_tokens:
            raise ValueError("min_output_tokens must not exceed max_output_tokens")
        if self.sub_window_s is not None and self.sub_window_s >= self.window_s:
            raise ValueError("sub_window_s must be shorter than window_s")
        return self

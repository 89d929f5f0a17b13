"""The request and response bodies of LoRAX's / text-generation-inference's generate API
(`POST /generate`, `/generate_stream`, `/`), as their clients send and read them:
lorax-client's `Client.generate(prompt, adapter_id=...)` and huggingface_hub's
`InferenceClient.text_generation(prompt, adapter_id=...)`.

The parameters are the union of TGI's and LoRAX's (LoRAX adds `adapter_source`,
`merged_adapters`, `api_token`, `ignore_eos_token`, `return_k_alternatives` and
`response_format`; TGI has `grammar`, `top_n_tokens`, `frequency_penalty`). Unknown
fields are refused, so a typo is not silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = None  # a served adapter's name (or the base model's)
    adapter_source: str | None = None  # LoRAX: hub | local (s3 / pbase: not served here)
    merged_adapters: dict[str, Any] | None = None  # LoRAX: lora/merge.py's MergeSpec
    api_token: str | None = None  # LoRAX: for private hub adapters; unused here
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(default=None, gt=0)
    frequency_penalty: float | None = None
    return_full_text: bool | None = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    truncate: int | None = Field(default=None, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int | None = Field(default=None, ge=0)  # TGI: details.top_tokens
    return_k_alternatives: int | None = Field(default=None, ge=1)  # LoRAX: per token
    grammar: dict[str, Any] | None = None  # TGI: {"type": "json" | "regex", "value": ...}
    response_format: dict[str, Any] | None = None  # LoRAX: {"type": "json_object", "schema"}


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # None for the first prompt token


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    skipped: bool = False  # LoRAX: accepted from a speculative draft (never reported)
    alternative_tokens: list[InputToken] | None = None  # LoRAX's return_k_alternatives


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] | None = None


class Details(BestOfSequence):
    prompt_tokens: int  # LoRAX's name
    input_length: int  # TGI's
    skipped_tokens: int = 0
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    input_length: int
    seed: int | None = None


class StreamResponse(BaseModel):
    index: int = 0
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None  # on the last event only
    details: StreamDetails | None = None  # on the last event only


class ErrorBody(BaseModel):
    """TGI's and LoRAX's error body, which their clients turn into exceptions by
    `error_type` (validation: HTTP 422)."""

    error: str
    error_type: str

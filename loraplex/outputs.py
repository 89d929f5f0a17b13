"""What the engine hands back: RequestOutput and CompletionOutput (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.lora.request import LoRARequest


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    lora_request: LoRARequest | None = None  # the adapter it ran with, as in vLLM

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    error: str | None = None  # set when the request failed (e.g. its adapter could not load)
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # with SamplingParams.prompt_logprobs, once computed: entry i = prompt token i given
    # the tokens before it (with the top-k), entry 0 None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

"""What the engine hands back (vLLM's shapes): RequestOutput and CompletionOutput for
generation, PoolingRequestOutput / EmbeddingRequestOutput for pooling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    prompt_token_ids: list[int] | None  # None for a prompt given as embeddings (vLLM's)
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    error: str | None = None  # set when the request failed (e.g. its adapter could not load)
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # with SamplingParams.prompt_logprobs, once computed: entry i = prompt token i given
    # the tokens before it (with the top-k), entry 0 None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class PoolingOutput:
    data: torch.Tensor  # the pooled (and normalized / truncated) vector, fp32 on the CPU


@dataclass
class PoolingRequestOutput:
    """A pooling request's result (vLLM's shape: `outputs` is one PoolingOutput)."""

    request_id: str
    outputs: PoolingOutput | None  # None until finished
    prompt_token_ids: list[int]
    finished: bool
    prompt: str | None = None
    lora_request: LoRARequest | None = None
    error: str | None = None  # set when the request failed (e.g. its adapter could not load)
    metrics: dict[str, float] = field(default_factory=dict)
    num_cached_tokens: int = 0  # always 0: pooling takes nothing from the prefix cache


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    @classmethod
    def from_base(cls, out: PoolingOutput) -> EmbeddingOutput:
        return cls(out.data.tolist())


@dataclass
class EmbeddingRequestOutput(PoolingRequestOutput):
    """LLM.embed's: `outputs.embedding` a list of floats."""

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> EmbeddingRequestOutput:
        return cls(out.request_id, EmbeddingOutput.from_base(out.outputs),
                   out.prompt_token_ids, out.finished, out.prompt, out.lora_request,
                   out.error, out.metrics, out.num_cached_tokens)


@dataclass
class ClassificationOutput:
    """vLLM's: a classifier's class probabilities (softmax of its head's logits)."""

    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    @classmethod
    def from_base(cls, out: PoolingOutput) -> ClassificationOutput:
        return cls(out.data.tolist())


@dataclass
class ClassificationRequestOutput(PoolingRequestOutput):
    """LLM.classify's: `outputs.probs` a list of floats."""

    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> ClassificationRequestOutput:
        return cls(out.request_id, ClassificationOutput.from_base(out.outputs),
                   out.prompt_token_ids, out.finished, out.prompt, out.lora_request,
                   out.error, out.metrics, out.num_cached_tokens)


@dataclass
class ScoringOutput:
    # the cosine similarity of the pair's embeddings, or a cross-encoder's output on the
    # pair (loraplex/scoring.py)
    score: float


@dataclass
class ScoringRequestOutput:
    """LLM.score's, one per pair: `outputs.score`; the two texts' ids, concatenated (as
    vLLM reports a bi-encoder's pair), or a cross-encoder's pair input."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    finished: bool = True


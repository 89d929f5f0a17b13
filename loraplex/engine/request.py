"""Engine-side state of one request: its n sequences, their detokenizers, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.sequence import Sequence
from loraplex.lora.request import LoRARequest
from loraplex.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestOutput
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    lora_request: LoRARequest | None
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it first ran (queue time ends)
    first_token_time: float | None = None
    error: str | None = None
    pooled: torch.Tensor | None = None  # a pooling request's embedding, once computed
    # the prompt was given as embeddings (vLLM's prompt_embeds): its ids are placeholders,
    # reported as None (as vLLM reports them)
    prompt_embedded: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def to_output(self) -> RequestOutput | PoolingRequestOutput:
        done = self.finished
        if isinstance(self.params, PoolingParams):
            return PoolingRequestOutput(
                request_id=self.request_id,
                outputs=PoolingOutput(self.pooled) if self.pooled is not None else None,
                prompt_token_ids=self.prompt_token_ids, finished=done, prompt=self.prompt,
                lora_request=self.lora_request, error=self.error, metrics=self._metrics())
        outputs = []
        for seq, detok in zip(self.seqs, self.detokenizers, strict=True):
            outputs.append(CompletionOutput(
                index=seq.index,
                text=detok.visible_text(seq.is_finished),
                token_ids=seq.output_token_ids,
                cumulative_logprob=(seq.cumulative_logprob
                                    if self.params.logprobs is not None else None),
                logprobs=list(seq.logprobs) if self.params.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                lora_request=self.lora_request))
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=(None if self.prompt_embedded
                                               else self.prompt_token_ids), outputs=outputs,
                             finished=done, lora_request=self.lora_request, error=self.error,
                             metrics=self._metrics(),
                             num_cached_tokens=max(s.num_cached_tokens for s in self.seqs),
                             prompt_logprobs=self._prompt_logprobs())

    def _metrics(self) -> dict[str, float]:
        metrics = {"arrival_time": self.arrival_time,
                   "num_prompt_tokens": float(len(self.prompt_token_ids))}
        if self.first_scheduled_time is not None:
            metrics["first_scheduled_time"] = self.first_scheduled_time
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        return metrics

    def _prompt_logprobs(self) -> list | None:
        first = self.seqs[0].prompt_logprobs
        return None if first is None or self.seqs[0].needs_prompt_logprobs else list(first)

"""What the completion and chat endpoints share: sampling params, limits, prompts, logprobs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import ErrorResponse, SamplingFields
from loraplex.entrypoints.serving_models import OpenAIServingModels
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, tokenizer) -> None:
        self.engine = engine
        self.models = models
        self.tokenizer = tokenizer  # the server's own copy: never shared with the engine thread
        self.max_model_len = models.max_model_len

    # ---- validation ---------------------------------------------------------------------
    @staticmethod
    def check_unsupported(req: SamplingFields) -> None:
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequestError("best_of is not supported yet (leave it unset or equal to n)",
                                  param="best_of")
        if req.logit_bias:
            raise BadRequestError("logit_bias is not supported yet", param="logit_bias")

    def sampling_params(self, req: SamplingFields, max_tokens: int | None,
                        logprobs: int | None) -> SamplingParams:
        """vLLM's request -> SamplingParams mapping; a bad value is a 400 naming the field."""
        def pick(value, default):
            return default if value is None else value
        try:
            return SamplingParams(
                n=req.n, temperature=pick(req.temperature, 1.0), top_p=pick(req.top_p, 1.0),
                top_k=pick(req.top_k, 0), min_p=pick(req.min_p, 0.0),
                presence_penalty=pick(req.presence_penalty, 0.0),
                frequency_penalty=pick(req.frequency_penalty, 0.0),
                repetition_penalty=pick(req.repetition_penalty, 1.0), seed=req.seed,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except (ValueError, TypeError) as e:
            param = str(e).split(" ", 1)[0]
            raise BadRequestError(str(e), param=param if param.isidentifier() else None) from e

    def fit_max_tokens(self, params: SamplingParams, prompt_len: int) -> None:
        """Refuse prompts/max_tokens past max_model_len (vLLM's message); fill a None."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the "
                "input messages.", param="prompt")
        if params.max_tokens is None:
            params.max_tokens = limit - prompt_len
            if params.min_tokens > params.max_tokens:
                raise BadRequestError(f"min_tokens ({params.min_tokens}) exceeds the "
                                      f"{params.max_tokens} tokens left in the context",
                                      param="min_tokens")
        elif prompt_len + params.max_tokens > limit:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"messages, {params.max_tokens} in the completion). Please reduce the "
                "length of the messages or completion.", param="max_tokens")

    def check_token_ids(self, ids: list[int]) -> None:
        """Empty is refused here; out-of-range ids are refused by the engine (its vocab)."""
        if not ids:
            raise BadRequestError("the prompt is empty", param="prompt")

    # ---- engine -------------------------------------------------------------------------
    async def start_requests(self, request_id: str, prompts: list[tuple[str | None, list[int]]],
                             params: list[SamplingParams], lora: LoRARequest | None
                             ) -> list[AsyncIterator[RequestOutput]]:
        """Queue one engine request per prompt (ids ``<request_id>-<i>``); on any failure
        abort those already queued. A 400 for a request the engine refuses."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for i, ((text, token_ids), p) in enumerate(zip(prompts, params, strict=True)):
                prompt: dict = {"prompt_token_ids": token_ids}
                if text is not None:
                    prompt["prompt"] = text
                streams.append(await self.engine.add_request(f"{request_id}-{i}", prompt, p,
                                                             lora))
        except BaseException as e:
            await self.abort_all(request_id, len(prompts))
            if isinstance(e, ValueError):  # includes LoRAError
                raise BadRequestError(str(e)) from e
            raise
        return streams

    async def abort_all(self, request_id: str, count: int) -> None:
        """Abort what is still running (a no-op for finished requests)."""
        for i in range(count):
            await self.engine.abort(f"{request_id}-{i}")

    @staticmethod
    def check_output(out: RequestOutput) -> None:
        if out.error:
            raise BadRequestError(out.error)

    # ---- logprobs -----------------------------------------------------------------------
    def token_text(self, token_id: int, logprob, as_id: bool = False) -> str:
        if as_id:
            return f"token_id:{token_id}"
        text = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self.tokenizer.decode([token_id])
        return text

    @staticmethod
    def error_event(err: ErrorResponse) -> str:
        return f"data: {err.model_dump_json()}\n\n"

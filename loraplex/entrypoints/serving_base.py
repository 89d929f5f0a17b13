"""What the completion and chat endpoints share: sampling params, limits, prompts, logprobs."""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from loraplex.beam_search import BeamSearch, BeamSearchOutput
from loraplex.engine.async_engine import AsyncLLMEngine, LoRANotLoadedError
from loraplex.engine.images import ImageInputs
from loraplex.entrypoints.errors import (
    APIError,
    BadRequestError,
    ServiceUnavailableError,
    error_body,
)
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    PromptLogprob,
    SamplingFields,
    UsageInfo,
)
from loraplex.entrypoints.serving_models import OpenAIServingModels
from loraplex.entrypoints.serving_utils import merge_async_iterators
from loraplex.lora.request import LoRARequest
from loraplex.outputs import RequestOutput
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_LOOKUPS = 8  # each retry means an unload/reload of this name completed meanwhile


@dataclass
class EngineRequests:
    """The engine requests behind one HTTP request: one per prompt."""

    ids: list[str]
    streams: list[AsyncIterator[RequestOutput]]


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, models: OpenAIServingModels, tokenizer,
                 enable_prompt_tokens_details: bool = False) -> None:
        """`enable_prompt_tokens_details`: usage tells the prompt tokens read from the
        prefix cache (vLLM's --enable-prompt-tokens-details)."""
        self.engine = engine
        self.enable_prompt_tokens_details = enable_prompt_tokens_details
        self.models = models
        # The server's own tokenizers, never the engine thread's: ``tokenizer`` decodes on
        # the event loop (short), ``encoder`` encodes and renders chat templates on a
        # thread of its own, so a huge prompt never stalls the streams of other requests
        # (an HF fast tokenizer must not be used by two threads at once: hence the copy).
        self.tokenizer = tokenizer
        self.encoder = copy.deepcopy(tokenizer)
        self._encode_thread = ThreadPoolExecutor(1, thread_name_prefix="loraplex-tokenize")
        self.max_model_len = models.max_model_len
        self.max_num_seqs = engine.engine.config.scheduler_config.max_num_seqs
        # generation_config.json's sampling defaults, for fields a request leaves unset
        self.defaults = engine.engine.generation_defaults.sampling

    def encoder_for(self, lora: LoRARequest | None):
        """The encoder of requests for `lora` (its own when it adds tokens); encoder
        thread only."""
        own = self._own_tokenizers(lora)
        return own.encoder if own is not None else self.encoder

    def encode_items(self, value: str | list, lora: LoRARequest | None,
                     add_special_tokens: bool, param: str) -> list[tuple[str | None, list[int]]]:
        """A completion's prompt or an embedding request's input (a string, token ids, or
        a list of either) as (text, token ids) per item, with `lora`'s tokenizer when it
        adds tokens; encoder thread only."""
        encoder = self.encoder_for(lora)
        if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
            items: list = [value]
        else:
            items = list(value)
        if not items:
            raise BadRequestError(f"the {param} is empty", param=param)
        return [(item, list(encoder(item, add_special_tokens=add_special_tokens).input_ids))
                if isinstance(item, str) else (None, list(item)) for item in items]

    def decoder_for(self, lora: LoRARequest | None):
        """The decoder of `lora`'s outputs (its own when it adds tokens); event loop only."""
        own = self._own_tokenizers(lora)
        return own.decoder if own is not None else self.tokenizer

    def _own_tokenizers(self, lora: LoRARequest | None):
        """The copies of `lora`'s own tokenizer (None: it uses the base's)."""
        return self.models.tokenizers.get(lora.lora_int_id) if lora is not None else None

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
              reasoning_tokens: int | None = None) -> UsageInfo:
        return UsageInfo.of(prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens,
                            show_cached=self.enable_prompt_tokens_details)

    @staticmethod
    def continuous_usage(req: SamplingFields) -> bool:
        """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk
        carries the usage so far."""
        opts = req.stream_options
        return bool(opts and opts.include_usage and opts.continuous_usage_stats)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (tokenizing with ``self.encoder``) on the encoder thread."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_thread, fn, *args)

    # ---- validation ---------------------------------------------------------------------
    @staticmethod
    def check_unsupported(req: SamplingFields) -> None:
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequestError("best_of is not supported yet (leave it unset or equal to n)",
                                  param="best_of")
        if req.stream_options is not None and not req.stream:
            raise BadRequestError("stream_options is only allowed when stream is true "
                                  "(OpenAI's and vLLM's rule)", param="stream_options")

    def check_n(self, n: int) -> None:
        """n >= 1 (SamplingParams), and at most a batch: each choice is a sequence."""
        if isinstance(n, int) and n > self.max_num_seqs:
            raise BadRequestError(f"n must be <= {self.max_num_seqs} (the server's "
                                  f"--max-num-seqs), got {n}", param="n")

    def sampling_params(self, req: SamplingFields, max_tokens: int | None,
                        logprobs: int | None, prompt_logprobs: int | None = None
                        ) -> SamplingParams:
        """vLLM's request -> SamplingParams mapping; a bad value is a 400 naming the field."""
        def pick(value, name: str, default):  # the request's, the model's, vLLM's
            return self.defaults.get(name, default) if value is None else value
        self.check_n(req.n)
        try:
            return SamplingParams(
                n=req.n, temperature=pick(req.temperature, "temperature", 1.0),
                top_p=pick(req.top_p, "top_p", 1.0), top_k=pick(req.top_k, "top_k", 0),
                min_p=pick(req.min_p, "min_p", 0.0),
                presence_penalty=pick(req.presence_penalty, "presence_penalty", 0.0),
                frequency_penalty=pick(req.frequency_penalty, "frequency_penalty", 0.0),
                repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
                seed=req.seed,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(req.logit_bias),
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
                structured_outputs=_structured_outputs(req), extra_args=req.extra_args())
        except BadRequestError:
            raise
        except (ValueError, TypeError) as e:
            param = str(e).split(" ", 1)[0]
            raise BadRequestError(str(e), param=param if param.isidentifier() else None) from e

    def truncated(self, prompt: tuple[str | None, list[int]],
                  params: SamplingParams | PoolingParams) -> tuple[str | None, list[int]]:
        """(text, ids) after truncate_prompt_tokens: the last ids, and no text (an echo
        decodes what is left)."""
        ids = params.truncate_prompt(prompt[1], self.max_model_len)
        return prompt if len(ids) == len(prompt[1]) else (None, ids)

    def fit_max_tokens(self, params: SamplingParams, prompt_len: int) -> None:
        """Refuse prompts/max_tokens past max_model_len (vLLM's message); fill a None."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise BadRequestError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the "
                "input messages.", param="prompt")
        if params.max_tokens is None:  # what is left, or the model's max_new_tokens
            params.max_tokens = min(limit - prompt_len,
                                    self.defaults.get("max_tokens", limit - prompt_len))
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
                             params: list[SamplingParams] | list[PoolingParams],
                             model: str | None,
                             lora: LoRARequest | None, cache_salt: str | None = None,
                             priority: int = 0, images: ImageInputs | None = None,
                             embeds: list[torch.Tensor | None] | None = None
                             ) -> EngineRequests:
        """Queue one engine request per prompt, all or none. ``lora`` is what ``model``
        resolved to; if that adapter was unloaded or replaced since, look ``model`` up
        again (404 once it is gone; the new weights after an in-place reload).
        `embeds`: per prompt, its embeddings in place of its (placeholder) ids, or None."""
        for _ in range(_MAX_LOOKUPS):
            try:
                return await self._queue(request_id, prompts, params, lora, cache_salt,
                                         priority, images, embeds)
            except LoRANotLoadedError:
                lora = await self.models.resolve(model)
        raise ServiceUnavailableError(f"the adapter {model!r} kept changing while this "
                                      "request was queued; retry")

    async def _queue(self, request_id: str, prompts: list[tuple[str | None, list[int]]],
                     params: list[SamplingParams] | list[PoolingParams],
                     lora: LoRARequest | None,
                     cache_salt: str | None, priority: int, images: ImageInputs | None = None,
                     embeds: list[torch.Tensor | None] | None = None
                     ) -> EngineRequests:
        """`images`: a chat request's one prompt's, processed (the prompt's ids expanded)."""
        specs = [getattr(p, "structured_outputs", None) for p in params]  # (PoolingParams:
        for spec in {id(s): s for s in specs if s is not None}.values():  # none)
            try:  # compiled here, off the step loop; the engine then finds it cached
                await self.off_loop(self.engine.engine.structured.compiled, spec)
            except ValueError as e:
                raise BadRequestError(str(e)) from e
        # engine ids of our own: a client's request_id may repeat, ours never collide
        base = f"{request_id}-{uuid.uuid4().hex[:8]}"
        queued = EngineRequests([f"{base}-{i}" for i in range(len(prompts))], [])
        try:
            for i, (rid, (text, token_ids), p) in enumerate(zip(queued.ids, prompts, params,
                                                                 strict=True)):
                prompt: dict = {"prompt_token_ids": token_ids}
                if embeds is not None and embeds[i] is not None:
                    prompt = {"prompt_embeds": embeds[i]}
                elif text is not None:
                    prompt["prompt"] = text
                if cache_salt is not None:
                    prompt["cache_salt"] = cache_salt
                if images:  # (Granite Speech's are audio: default_mm_loras by modality)
                    prompt["multi_modal_data"] = dict.fromkeys(
                        self.engine.engine.data_keys(images), images)
                queued.streams.append(
                    await self.engine.add_request(rid, prompt, p, lora, load_lora=False,
                                                  priority=priority))
        except BaseException as e:
            await self.abort_all(queued)
            if isinstance(e, ValueError) and not isinstance(e, LoRANotLoadedError):
                first = str(e).split(" ", 1)[0]  # the engine's checks name the field first
                param = first if first in ("prompt", "logit_bias", "cache_salt", "logprobs",
                                           "prompt_logprobs", "allowed_token_ids") else (
                    "messages" if images else None)
                raise BadRequestError(str(e), param=param) from e  # includes LoRAError
            raise
        return queued

    async def beam_search(self, req: SamplingFields, request_id: str, params: SamplingParams,
                          prompts: list[tuple[str | None, list[int]]],
                          lora: LoRARequest | None) -> list[BeamSearchOutput]:
        """vLLM's use_beam_search: req.n beams per prompt, best first, by the search of
        loraplex/beam_search.py, each step's beams queued as engine requests. Whole
        replies only, without logprobs or structured outputs."""
        for field, on in (("stream", req.stream), ("logprobs", params.logprobs is not None),
                          ("prompt_logprobs", params.prompt_logprobs is not None),
                          ("structured_outputs", params.structured_outputs is not None)):
            if on:
                raise BadRequestError(f"use_beam_search does not support {field}",
                                      param=field)
        search = BeamSearch([ids for _, ids in prompts], [lora] * len(prompts),
                            BeamSearchParams(beam_width=req.n, max_tokens=params.max_tokens,
                                             ignore_eos=params.ignore_eos,
                                             temperature=req.temperature or 0.0,
                                             length_penalty=req.length_penalty),
                            self.engine.engine.eos_token_ids)
        step = 0
        while beams := search.live():
            queued = await self.start_requests(
                f"{request_id}-beam{step}", [(None, b.tokens) for b in beams],
                [search.step_params] * len(beams), req.model, lora, req.cache_salt,
                req.priority)
            finals: dict[int, RequestOutput] = {}
            try:
                async for i, out in merge_async_iterators(*queued.streams):
                    finals[i] = out
            finally:
                await self.abort_all(queued)
            for out in finals.values():
                self.check_output(out)
            search.advance([finals[i].outputs[0].logprobs[0] for i in range(len(beams))])
            step += 1
        decoder = self.decoder_for(lora)
        return search.best(lambda _, own: decoder.decode(
            own, skip_special_tokens=params.skip_special_tokens))

    async def abort_all(self, queued: EngineRequests) -> None:
        """Abort what is still running (a no-op for finished requests)."""
        for rid in queued.ids:
            await self.engine.abort(rid)

    async def final_output(self, queued: EngineRequests) -> RequestOutput:
        """A one-prompt request's last output, checked; the request is aborted however
        this ends (a client that leaves included)."""
        try:
            final = None
            async for out in queued.streams[0]:
                final = out
            assert final is not None
            self.check_output(final)
            return final
        finally:
            await self.abort_all(queued)

    @staticmethod
    def check_output(out: RequestOutput) -> None:
        if out.error:
            raise BadRequestError(out.error)

    # ---- logprobs -----------------------------------------------------------------------
    def prompt_logprobs(self, req: CompletionRequest | ChatCompletionRequest,
                        out: RequestOutput) -> list[dict[int, PromptLogprob] | None] | None:
        """vLLM's `prompt_logprobs` field when the request asked for it: per prompt token,
        token id -> logprob."""
        if req.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        as_ids = req.return_tokens_as_token_ids
        return [None if entry is None else {
            t: PromptLogprob(logprob=v.logprob, rank=v.rank,
                             decoded_token=self.token_text(t, v, as_ids, out.lora_request))
            for t, v in entry.items()} for entry in out.prompt_logprobs]

    def token_text(self, token_id: int, logprob, as_id: bool = False,
                   lora: LoRARequest | None = None) -> str:
        if as_id:
            return f"token_id:{token_id}"
        text = getattr(logprob, "decoded_token", None)
        if text is None:
            text = self.decoder_for(lora).decode([token_id])
        return text

    async def sse(self, events: AsyncIterator[str], queued: EngineRequests,
                  error_event: Callable[[str, int], str] | None = None,
                  done: str = "data: [DONE]\n\n") -> AsyncIterator[str]:
        """A streamed response body: the events, then an error event if they fail (the
        server keeps serving), then `done`; the requests are aborted when it ends, a
        client that leaves early included. `error_event(message, status)`: an API's own
        error event (default: OpenAI's error body as a data line)."""
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield (error_event(e.message, int(e.status)) if error_event else
                   self.error_event(e.to_response()))
        except Exception as e:  # the engine failed mid-stream: tell the client, keep serving
            yield (error_event(str(e), 500) if error_event else
                   self.error_event(error_body(str(e), "InternalServerError", 500)))
        finally:
            await events.aclose()
            await self.abort_all(queued)
        if done:
            yield done

    @staticmethod
    def error_event(err: ErrorResponse) -> str:
        return f"data: {err.model_dump_json()}\n\n"


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings)."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise ValueError("logit_bias keys must be token ids (integers as strings)") from None


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def _structured_outputs(req: SamplingFields) -> StructuredOutputsParams | None:
    """OpenAI's response_format, vLLM's structured_outputs or its guided_* fields (one of
    them) -> StructuredOutputsParams; anything malformed is a 400 naming the field."""
    given: list[tuple[str, dict]] = []
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise BadRequestError("response_format json_schema needs json_schema.schema, "
                                      "a JSON schema object", param="response_format")
            given.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise BadRequestError("response_format type must be text, json_object or "
                                  f"json_schema, got {kind!r}", param="response_format")
    if req.structured_outputs is not None:
        given.append(("structured_outputs", dict(req.structured_outputs)))
    for field, key in _GUIDED.items():
        if getattr(req, field) is not None:
            given.append((field, {key: getattr(req, field)}))
    if len(given) > 1:
        raise BadRequestError("give one way to constrain the output, not "
                              + " and ".join(f for f, _ in given), param=given[1][0])
    if not given:
        return None
    field, spec = given[0]
    try:
        return StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as e:
        raise BadRequestError(f"{field}: {e}", param=field) from e

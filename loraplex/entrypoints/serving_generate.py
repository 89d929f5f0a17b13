"""LoRAX's and text-generation-inference's generate API over the same engine, so their
clients (lorax-client, huggingface_hub's `InferenceClient.text_generation`) work against
loraplex unchanged:

    POST /generate         {"inputs": "...", "parameters": {"adapter_id": "sql", ...}}
    POST /generate_stream  the same, one server-sent event per generated token
    POST /                 either, by the body's "stream" (not streamed: a list of one)

`adapter_id` is what `model` is on the OpenAI routes: a served adapter's name (or the
base model's; none: the base), so requests for different adapters share batches as
usual. With runtime LoRA updating on, an unknown id goes to the LoRA resolvers (the HF
hub resolver is LoRAX's "hub" source) and `adapter_source: "local"` with a directory
loads it under that path. Sampling follows TGI: greedy unless `do_sample` or a sampling
parameter (temperature, top_k, top_p) is set; a sampled request without `seed` gets one,
reported in `details.seed`. Errors are TGI's `{"error", "error_type"}` (validation: 422).
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from typing import Any

from loraplex import envs
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.entrypoints.errors import APIError, BadRequestError, NotFoundError
from loraplex.entrypoints.generate_protocol import (
    BestOfSequence,
    Details,
    ErrorBody,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from loraplex.entrypoints.protocol import random_id
from loraplex.entrypoints.serving_base import EngineRequests, OpenAIServing
from loraplex.lora.merge import MergeSpec
from loraplex.lora.request import LoRARequest
from loraplex.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.sampling_params import SamplingParams, StructuredOutputsParams

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's
ADAPTER_SOURCES = ("hub", "local")


class TokenTexts:
    """Each token's text as TGI reports it: what the token adds to the text before it
    (the engine's incremental detokenizer, special tokens kept, no stop strings), a
    character split over tokens coming whole with its last token (the ones before: "")."""

    _PARAMS = SamplingParams(skip_special_tokens=False)

    def __init__(self, tokenizer: Any, before: list[int]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, before, self._PARAMS)

    def push(self, token: int) -> str:
        n = len(self._detok.output_text)
        self._detok.append(token)
        return self._detok.output_text[n:]


class ServingGenerate(OpenAIServing):
    async def generate(self, req: GenerateRequest, stream: bool
                       ) -> GenerateResponse | AsyncIterator[str]:
        """The response, or (`stream`) the server-sent events' lines."""
        p = req.parameters
        _check_supported(p, stream)
        lora = await (self._merged(p) if p.merged_adapters is not None
                      else self._adapter(p.adapter_id, p.adapter_source))
        params = _sampling_params(p)
        prompt = (await self.off_loop(self.encode_items, req.inputs, lora, True, "inputs"))[0]
        prompt = self.truncated(prompt, params)
        if p.max_new_tokens is None:  # TGI's default, within the context
            params.max_tokens = max(1, min(DEFAULT_MAX_NEW_TOKENS,
                                           self.max_model_len - len(prompt[1])))
        self.fit_max_tokens(params, len(prompt[1]))
        model = lora.lora_name if p.merged_adapters is not None and lora else p.adapter_id
        queued = await self.start_requests(random_id("generate"), [prompt], [params], model,
                                           lora)
        if stream:
            return self._sse(self._events(req, prompt[1], params, queued), queued)
        return self._response(req, params, await self.final_output(queued))

    async def _adapter(self, adapter_id: str | None, source: str | None
                       ) -> LoRARequest | None:
        """The adapter `adapter_id` names (None or the base model's name: the base)."""
        try:
            return await self.models.resolve(adapter_id or None)
        except NotFoundError:
            if not (source == "local" and envs.LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING
                    and adapter_id and os.path.isdir(adapter_id)):
                raise
        await self.models.load_lora_adapter(adapter_id, adapter_id)  # LoRAX's local source
        return await self.models.resolve(adapter_id)

    async def _merged(self, p: GenerateParameters) -> LoRARequest:
        """LoRAX's merged_adapters: the merged adapter (lora/merge.py), built once per
        merge. One id is that adapter as it is (LoRAX's rule: nothing to merge)."""
        m = p.merged_adapters
        if p.adapter_id is not None:
            raise BadRequestError("give adapter_id or merged_adapters, not both",
                                  param="merged_adapters")
        unknown = set(m) - {"ids", "weights", "merge_strategy", "density",
                            "majority_sign_method"}
        if unknown:
            raise BadRequestError(f"merged_adapters has unknown fields: {sorted(unknown)}",
                                  param="merged_adapters")
        try:
            spec = MergeSpec.parse(m.get("ids"), m.get("weights"), m.get("merge_strategy"),
                                   m.get("density"), m.get("majority_sign_method"))
        except ValueError as e:
            raise BadRequestError(str(e), param="merged_adapters") from e
        sources = []
        for adapter_id in spec.ids:
            if self.models.is_base_model(adapter_id):
                raise BadRequestError(f"merged_adapters: {adapter_id!r} is the base model, "
                                      "which cannot be merged", param="merged_adapters")
            try:
                sources.append(await self._adapter(adapter_id, p.adapter_source))
            except NotFoundError as e:
                raise BadRequestError(f"merged_adapters: unknown adapter {adapter_id!r}",
                                      param="merged_adapters") from e
        if len(sources) == 1:
            return sources[0]
        return await self.models.merged(spec, sources)

    # ---- responses ----------------------------------------------------------------------
    def _texts(self, lora: LoRARequest | None, before: list[int]) -> TokenTexts:
        return TokenTexts(self.decoder_for(lora), before)

    def _tokens(self, o: CompletionOutput, texts: TokenTexts, start: int, k: int,
                alternatives: bool) -> tuple[list[Token], list[list[Token]]]:
        """The generated tokens from `start` on (their texts from `texts`, which has seen
        the ones before), with their top-k alternatives (LoRAX's way) if `alternatives`,
        and each position's top-k tokens (TGI's top_tokens)."""
        special = set(self.decoder_for(o.lora_request).all_special_ids)
        tokens, tops = [], []
        for tok, entry in zip(o.token_ids[start:], (o.logprobs or [])[start:], strict=True):
            top = [self._token(t, lp, special, o.lora_request) for t, lp in _top(entry, k)]
            tokens.append(Token(id=tok, text=texts.push(tok), logprob=entry[tok].logprob,
                                special=tok in special,
                                alternative_tokens=[InputToken(id=t.id, text=t.text,
                                                               logprob=t.logprob)
                                                    for t in top] if alternatives else None))
            tops.append(top)
        return tokens, tops

    def _token(self, tok: int, lp: Logprob, special: set[int], lora: LoRARequest | None
               ) -> Token:
        return Token(id=tok, text=self.token_text(tok, lp, lora=lora), logprob=lp.logprob,
                     special=tok in special)

    def _prefill(self, out: RequestOutput) -> list[InputToken]:
        """decoder_input_details: the prompt's tokens, each with its logprob given the
        ones before it (the first has none)."""
        texts = self._texts(out.lora_request, [])
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return [InputToken(id=tok, text=texts.push(tok),
                           logprob=entry[tok].logprob if entry else None)
                for tok, entry in zip(out.prompt_token_ids, entries, strict=True)]

    def _sequence(self, req: GenerateRequest, params: SamplingParams, out: RequestOutput,
                  o: CompletionOutput, cls: type[BestOfSequence]) -> BestOfSequence:
        p = req.parameters
        tokens, tops = self._tokens(o, self._texts(o.lora_request, out.prompt_token_ids), 0,
                                    _top_k(p), p.return_k_alternatives is not None)
        extra = {"prompt_tokens": len(out.prompt_token_ids),
                 "input_length": len(out.prompt_token_ids)} if cls is Details else {}
        return cls(generated_text=self._text(req, o), finish_reason=_finish_reason(o),
                   generated_tokens=len(o.token_ids), seed=params.seed,
                   prefill=self._prefill(out) if p.decoder_input_details else [],
                   tokens=tokens, top_tokens=tops if p.top_n_tokens else None, **extra)

    @staticmethod
    def _text(req: GenerateRequest, o: CompletionOutput) -> str:
        return (req.inputs if req.parameters.return_full_text else "") + o.text

    def _response(self, req: GenerateRequest, params: SamplingParams, out: RequestOutput
                  ) -> GenerateResponse:
        """best_of > 1: the sequence of the highest cumulative logprob; the others in
        details.best_of_sequences."""
        ranked = sorted(out.outputs, key=lambda o: -(o.cumulative_logprob or 0.0))
        best = ranked[0]
        if not req.parameters.details:
            return GenerateResponse(generated_text=self._text(req, best))
        details = self._sequence(req, params, out, best, Details)
        if len(ranked) > 1:
            details.best_of_sequences = [self._sequence(req, params, out, o, BestOfSequence)
                                         for o in ranked[1:]]
        return GenerateResponse(generated_text=details.generated_text, details=details)

    # ---- streaming ----------------------------------------------------------------------
    async def _events(self, req: GenerateRequest, prompt: list[int], params: SamplingParams,
                      queued: EngineRequests) -> AsyncIterator[str]:
        """One event per generated token; the last also has the text and the details."""
        p = req.parameters
        k, sent, texts = _top_k(p), 0, None
        last_token: tuple[Token, list[Token]] | None = None
        async for out in queued.streams[0]:
            self.check_output(out)
            o = out.outputs[0]
            texts = texts or self._texts(o.lora_request, prompt)
            tokens, tops = self._tokens(o, texts, sent, k, p.return_k_alternatives is not None)
            sent += len(tokens)
            pairs = list(zip(tokens, tops, strict=True))
            if o.finished() and not pairs and last_token is not None:  # (no new token: the
                pairs = [(last_token[0].model_copy(update={"text": ""}), last_token[1])]
            for i, (token, top) in enumerate(pairs):  # last event repeats the last, textless)
                last = o.finished() and i == len(pairs) - 1
                event = StreamResponse(
                    token=token, top_tokens=top if p.top_n_tokens else None,
                    generated_text=self._text(req, o) if last else None,
                    details=StreamDetails(finish_reason=_finish_reason(o),
                                          generated_tokens=len(o.token_ids),
                                          prompt_tokens=len(prompt), input_length=len(prompt),
                                          seed=params.seed) if last else None)
                yield f"data:{event.model_dump_json()}\n\n"
                last_token = token, top

    async def _sse(self, events: AsyncIterator[str], queued: EngineRequests
                   ) -> AsyncIterator[str]:
        """The events, then, if they fail, TGI's error event; the request is aborted when
        the stream ends (a client that leaves early included). No `[DONE]`: TGI has none."""
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield f"data:{error_body(e).model_dump_json()}\n\n"
        except Exception as e:  # the engine failed mid-stream: tell the client, keep serving
            yield f"data:{ErrorBody(error=str(e), error_type='generation').model_dump_json()}\n\n"
        finally:
            await events.aclose()
            await self.abort_all(queued)


def error_body(e: APIError) -> ErrorBody:
    """TGI's error body for an error of the OpenAI routes' kinds."""
    kind = {400: "validation", 404: "not_found", 503: "overloaded"}.get(e.status, "generation")
    return ErrorBody(error=e.message, error_type=kind)


def error_status(e: APIError) -> int:
    """TGI answers a validation error with 422."""
    return 422 if e.status == 400 else e.status


def _check_supported(p: GenerateParameters, stream: bool) -> None:
    """What loraplex does not do, refused rather than ignored."""
    refused = {"watermark": p.watermark and "watermarking is not supported",
               "typical_p": p.typical_p not in (None, 1.0) and "typical sampling is not "
               "supported (leave typical_p unset)"}
    for field, why in refused.items():
        if why:
            raise BadRequestError(f"{field}: {why}", param=field)
    if p.adapter_source not in (None, *ADAPTER_SOURCES):
        raise BadRequestError(f"adapter_source {p.adapter_source!r} is not served here (use "
                              "one of hub, local, or a served adapter's name)",
                              param="adapter_source")
    if (p.best_of or 1) > 1 and (stream or not _sampling(p)):
        raise BadRequestError("best_of > 1 needs sampling and no stream (TGI's rule)",
                              param="best_of")
    if p.grammar is not None and p.response_format is not None:
        raise BadRequestError("give grammar or response_format, not both", param="grammar")


def _sampling(p: GenerateParameters) -> bool:
    """TGI samples when asked to or when a sampling parameter is set (temperature 0: no)."""
    if p.temperature == 0:
        return False
    return p.do_sample or (p.temperature not in (None, 1.0)) or p.top_k is not None \
        or p.top_p not in (None, 1.0)


def _top_k(p: GenerateParameters) -> int:
    return max(p.top_n_tokens or 0, p.return_k_alternatives or 0)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of a position's logprobs, best first."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
    return [(t, lp) for t, lp in ranked if lp.rank is not None and lp.rank <= k][:k]


def _structured(p: GenerateParameters) -> StructuredOutputsParams | None:
    """TGI's grammar ({"type": "json" | "regex", "value"}) or LoRAX's response_format
    ({"type": "json_object", "schema"?})."""
    if p.grammar is not None:
        kind, value = p.grammar.get("type"), p.grammar.get("value")
        if kind == "json" and isinstance(value, dict | str):
            return StructuredOutputsParams(json=value)
        if kind == "regex" and isinstance(value, str):
            return StructuredOutputsParams(regex=value)
        raise BadRequestError('grammar must be {"type": "json", "value": a schema} or '
                              '{"type": "regex", "value": a pattern}', param="grammar")
    if p.response_format is not None:
        if p.response_format.get("type") != "json_object":
            raise BadRequestError('response_format must be {"type": "json_object"} (with an '
                                  'optional "schema")', param="response_format")
        schema = p.response_format.get("schema")
        return StructuredOutputsParams(json=schema) if schema else \
            StructuredOutputsParams(json_object=True)
    return None


def _sampling_params(p: GenerateParameters) -> SamplingParams:
    sampled = _sampling(p)
    seed = p.seed if p.seed is not None or not sampled else random.randrange(2**31)
    try:
        return SamplingParams(
            n=p.best_of or 1, temperature=(p.temperature or 1.0) if sampled else 0.0,
            top_p=p.top_p or 1.0, top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, seed=seed, stop=list(p.stop),
            ignore_eos=p.ignore_eos_token, max_tokens=p.max_new_tokens, logprobs=_top_k(p),
            prompt_logprobs=0 if p.decoder_input_details else None,
            truncate_prompt_tokens=p.truncate, structured_outputs=_structured(p))
    except ValueError as e:
        raise BadRequestError(str(e)) from e


def _finish_reason(o: CompletionOutput) -> str:
    """TGI's: length, eos_token, or stop_sequence (a stop string or stop token id)."""
    if o.finish_reason == "length":
        return "length"
    return "eos_token" if o.stop_reason is None else "stop_sequence"

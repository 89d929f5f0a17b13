"""POST /v1/completions: prompts (text or token ids, one or many) -> choices, or an SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import torch

from loraplex.beam_search import BeamSearchOutput
from loraplex.engine.prompt_embeds import (
    NOT_ENABLED,
    PLACEHOLDER_ID,
    checked_prompt_embeds,
    decode_prompt_embeds,
)
from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    random_id,
)
from loraplex.entrypoints.serving_base import EngineRequests, OpenAIServing
from loraplex.entrypoints.serving_utils import merge_async_iterators
from loraplex.lora.request import LoRARequest
from loraplex.outputs import CompletionOutput, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    def _prompts(self, req: CompletionRequest, lora: LoRARequest | None
                 ) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per prompt, with `lora`'s tokenizer when it adds tokens; on
        the encoder thread."""
        if req.prompt is None:
            return []
        out = self.encode_items(req.prompt, lora, req.add_special_tokens, "prompt")
        for _, ids in out:
            self.check_token_ids(ids)
        return out

    def _prompt_embeds(self, req: CompletionRequest) -> list[torch.Tensor]:
        """vLLM's prompt_embeds, each decoded and checked; on the encoder thread."""
        items = [req.prompt_embeds] if isinstance(req.prompt_embeds, str) \
            else list(req.prompt_embeds or [])
        hidden = self.engine.engine.model.args.hidden_size
        try:
            return [checked_prompt_embeds(decode_prompt_embeds(item), hidden)
                    for item in items]
        except ValueError as e:
            raise BadRequestError(str(e), param="prompt_embeds") from e

    def _check_prompt_embeds(self, req: CompletionRequest) -> None:
        """What prompt_embeds cannot go with (vLLM's refusals)."""
        if not self.engine.engine.model_config.enable_prompt_embeds:
            raise BadRequestError(NOT_ENABLED, param="prompt_embeds")
        for field, why in (("echo", req.echo and "there is no prompt text to echo"),
                           ("prompt_logprobs", req.prompt_logprobs is not None
                            and "the prompt has no token ids to score"),
                           ("use_beam_search", req.use_beam_search and "not supported")):
            if why:
                raise BadRequestError(f"{field} with prompt_embeds: {why}", param=field)

    async def create_completion(self, req: CompletionRequest):
        """A CompletionResponse, or an async iterator of SSE lines when ``stream``."""
        self.check_unsupported(req)
        if req.suffix:
            raise BadRequestError("suffix is not supported yet", param="suffix")
        if req.prompt is None and req.prompt_embeds is None:
            raise BadRequestError("give a prompt (or prompt_embeds)", param="prompt")
        if req.prompt_embeds is not None:
            self._check_prompt_embeds(req)
        lora = await self.models.resolve(req.model)
        model = req.model or self.models.base_model_name
        prompt_logprobs = req.prompt_logprobs
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs
            prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs)
        # embedded prompts first (vLLM's order), as placeholder ids of their lengths
        embeds = await self.off_loop(self._prompt_embeds, req)
        prompts = [self.truncated(p, params)
                   for p in [(None, [PLACEHOLDER_ID] * e.shape[0]) for e in embeds]
                   + await self.off_loop(self._prompts, req, lora)]
        per_prompt = []
        for _, ids in prompts:  # the same params, but max_tokens fits each prompt's context
            p = params.clone()
            self.fit_max_tokens(p, len(ids))
            per_prompt.append(p)
        request_id = req.request_id or random_id("cmpl")
        if req.use_beam_search:
            params.max_tokens = min(p.max_tokens for p in per_prompt)
            return self._beam_response(req, request_id, model, prompts, lora, await
                                       self.beam_search(req, request_id, params, prompts, lora))
        queued = await self.start_requests(
            request_id, prompts, per_prompt, req.model, lora, req.cache_salt, req.priority,
            embeds=[*embeds, *[None] * (len(prompts) - len(embeds))] if embeds else None)
        if req.stream:
            return self.sse(self._stream(req, request_id, model, prompts, queued), queued)
        try:
            return await self._full(req, request_id, model, prompts, queued.streams)
        finally:
            await self.abort_all(queued)

    def _echo(self, req: CompletionRequest, prompt: tuple[str | None, list[int]],
              lora: LoRARequest | None) -> str:
        if not req.echo:
            return ""
        return prompt[0] if prompt[0] is not None else self.decoder_for(lora).decode(prompt[1])

    async def _full(self, req: CompletionRequest, request_id: str, model: str,
                    prompts: list, streams: list) -> CompletionResponse:
        finals: dict[int, RequestOutput] = {}
        async for i, out in merge_async_iterators(*streams):
            finals[i] = out
        choices, completion_tokens = [], 0
        for i in range(len(prompts)):
            out = finals[i]
            self.check_output(out)
            prefix = self._echo(req, prompts[i], out.lora_request)
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                lp = None
                if req.logprobs is not None:
                    echoed, start = self._echoed_logprobs(req, out, len(prefix))
                    lp = echoed + self._logprobs(o, 0, len(o.token_ids), start,
                                                 req.return_tokens_as_token_ids)
                choices.append(CompletionChoice(
                    index=i * req.n + o.index, text=prefix + o.text, logprobs=lp,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                    prompt_logprobs=self.prompt_logprobs(req, out)))
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        cached = sum(out.num_cached_tokens for out in finals.values())
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=self.usage(prompt_tokens, completion_tokens, cached))

    def _beam_response(self, req: CompletionRequest, request_id: str, model: str,
                       prompts: list, lora: LoRARequest | None,
                       results: list[BeamSearchOutput]) -> CompletionResponse:
        choices, completion_tokens = [], 0
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            prefix = self._echo(req, prompt, lora)
            for j, beam in enumerate(result.sequences):
                completion_tokens += len(beam.logprobs)
                choices.append(CompletionChoice(index=i * req.n + j, text=prefix + beam.text,
                                                finish_reason=beam.finish_reason))
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return CompletionResponse(id=request_id, model=model, choices=choices,
                                  usage=UsageInfo.of(prompt_tokens, completion_tokens))

    def _echoed_logprobs(self, req: CompletionRequest, out: RequestOutput, prefix_len: int
                         ) -> tuple[CompletionLogProbs, int]:
        """echo + logprobs: the prompt's tokens (the first one has no logprob), to go before
        the generated ones, as OpenAI's legacy completions return them; and the generated
        tokens' first text offset: after the prompt's token texts (a BOS counts as its
        text, so the offsets keep rising), or after the echoed text without echo."""
        if not req.echo:
            return CompletionLogProbs(), prefix_len
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return self._token_logprobs(out.prompt_token_ids, entries, 0,
                                    req.return_tokens_as_token_ids, out.lora_request,
                                    strict=True)

    def _logprobs(self, o: CompletionOutput, start: int, end: int, offset: int,
                  as_ids: bool = False) -> CompletionLogProbs:
        return self._token_logprobs(o.token_ids[start:end], (o.logprobs or [])[start:end],
                                    offset, as_ids, o.lora_request)[0]

    def _token_logprobs(self, token_ids: list[int], entries: list, offset: int,
                        as_ids: bool, lora: LoRARequest | None, strict: bool = False
                        ) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs of tokens from their logprob dicts (None: no logprob, as
        for a prompt's first token), text offsets from `offset` on; and the offset after."""
        lp = CompletionLogProbs()
        for tok, entry in zip(token_ids, entries, strict=strict):
            text = self.token_text(tok, entry.get(tok) if entry is not None else None, as_ids,
                                   lora)
            lp.tokens.append(text)
            lp.token_logprobs.append(entry[tok].logprob
                                     if entry is not None and tok in entry else None)
            lp.top_logprobs.append(None if entry is None else
                                   {self.token_text(t, v, as_ids, lora): v.logprob
                                    for t, v in entry.items()})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    async def _stream(self, req: CompletionRequest, request_id: str, model: str,
                      prompts: list, queued: EngineRequests) -> AsyncIterator[str]:
        created = int(time.time())
        n = req.n
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        offsets: dict[int, int] = {}
        done: set[int] = set()
        first_sent: set[int] = set()  # choices whose first chunk (with prompt_logprobs) went
        completion_tokens = 0
        cached: dict[int, int] = {}  # prompt -> its tokens read from the prefix cache
        continuous = self.continuous_usage(req)  # each chunk: its prompt's and choice's
        async for i, out in merge_async_iterators(*queued.streams):
            self.check_output(out)
            cached[i] = out.num_cached_tokens
            for o in out.outputs:
                idx = i * n + o.index
                if idx in done:
                    continue
                prefix = "" if idx in sent_text else self._echo(req, prompts[i], out.lora_request)
                t0, k0 = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                delta = o.text[t0:]
                if not delta and not prefix and o.finish_reason is None:
                    continue  # text held back (partial stop string / utf-8)
                sent_text[idx], sent_tokens[idx] = len(o.text), len(o.token_ids)
                lp = None
                if req.logprobs is not None:
                    echoed, start = CompletionLogProbs(), offsets.get(idx, 0)
                    if idx not in first_sent:  # the first chunk: the echoed prompt's
                        echoed, start = self._echoed_logprobs(req, out, len(prefix))
                    lp = echoed + self._logprobs(o, k0, len(o.token_ids), start,
                                                 req.return_tokens_as_token_ids)
                    offsets[idx] = start + len(delta)
                if o.finish_reason is not None:
                    done.add(idx)
                    completion_tokens += len(o.token_ids)
                chunk = CompletionStreamResponse(
                    id=request_id, created=created, model=model,
                    choices=[CompletionChoice(
                        index=idx, text=prefix + delta, logprobs=lp,
                        finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                        prompt_logprobs=(self.prompt_logprobs(req, out)
                                         if idx not in first_sent else None))],
                    usage=self.usage(len(prompts[i][1]), len(o.token_ids),
                                     out.num_cached_tokens) if continuous else None)
                first_sent.add(idx)
                yield f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"
        if req.stream_options and req.stream_options.include_usage:
            prompt_tokens = sum(len(ids) for _, ids in prompts)
            usage = self.usage(prompt_tokens, completion_tokens, sum(cached.values()))
            chunk = CompletionStreamResponse(id=request_id, created=created, model=model,
                                             choices=[], usage=usage)
            yield f"data: {chunk.model_dump_json()}\n\n"

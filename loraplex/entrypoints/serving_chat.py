"""POST /v1/chat/completions: messages -> chat template -> the engine; role/delta streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex.beam_search import BeamSearchOutput
from loraplex.engine.images import ImageInputs
from loraplex.entrypoints.chat_images import ChatImages
from loraplex.entrypoints.errors import APIError, BadRequestError
from loraplex.entrypoints.protocol import (
    ChatCompletionChoice,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    ToolCall,
    UsageInfo,
    random_id,
)
from loraplex.entrypoints.serving_base import EngineRequests, OpenAIServing
from loraplex.entrypoints.tool_calls import (
    PartialCall,
    call_deltas,
    final_call_deltas,
    forced_partial,
    to_tool_calls,
    tool_choice_outputs,
    tool_mode,
)
from loraplex.entrypoints.tool_parsers import PARSERS
from loraplex.lora.request import LoRARequest
from loraplex.outputs import CompletionOutput, RequestOutput
from loraplex.reasoning import REASONING_PARSERS, reasoning_token_count
from loraplex.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    def __init__(self, *args: Any, chat_template: str | None = None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 response_role: str = "assistant", **kw: Any) -> None:
        """`tool_call_parser`: a PARSERS name, with which tool_choice "auto" is served
        (--enable-auto-tool-choice); None refuses it. `reasoning_parser`: a
        REASONING_PARSERS name: replies are split into reasoning and content, and tool
        calls are read from the content. `response_role`: the role of a new reply."""
        super().__init__(*args, **kw)
        self.chat_template = chat_template
        self.response_role = response_role
        self.tool_call_parser = tool_call_parser
        self.tool_parser = PARSERS[tool_call_parser]() if tool_call_parser else None
        if tool_call_parser == "openai" and reasoning_parser is None:
            reasoning_parser = "openai_gptoss"  # harmony replies: the analysis apart
        self.reasoning = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None

    def _reasoning_for(self, req: ChatCompletionRequest) -> Any:
        """The reasoning parser for this request: the server's, or the one its
        chat_template_kwargs pick (deepseek_v3: R1's with "thinking", else none)."""
        if self.reasoning is None:
            return None
        return self.reasoning.for_request(req.chat_template_kwargs)

    def _split(self, req: ChatCompletionRequest, text: str, finished: bool = True
               ) -> tuple[str | None, str]:
        """(reasoning, content) of a reply's text (no reasoning parser: None, text)."""
        reasoning = self._reasoning_for(req)
        return reasoning.split(text, finished) if reasoning else (None, text)

    def _messages(self, req: ChatCompletionRequest, images: ChatImages
                  ) -> list[dict[str, Any]]:
        """The messages for the chat template; their images (decoded) into `images`."""
        out = []
        for i, m in enumerate(req.messages):
            try:
                content = images.content(m.content, i)
            except ValueError as e:
                raise BadRequestError(str(e), param="messages") from e
            msg = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        if not out:
            raise BadRequestError("messages must not be empty", param="messages")
        return out

    def render(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None,
               lora: LoRARequest | None = None) -> tuple[str, list[int], ChatImages]:
        """Apply the chat template (request's, else --chat-template, else tokenizer's) and
        tokenize, with `lora`'s tokenizer when it adds tokens; on the encoder thread, which
        decodes (or fetches) the messages' images (and videos) too: the text, its ids (each
        image's placeholder expanded: what the engine will see, and count), the images.
        `tools`: what the template is told the model may call (None: nothing)."""
        template = req.chat_template or self.chat_template
        template_kw: dict[str, Any] = {"tools": tools} if tools else {}
        if req.reasoning_effort is not None:  # as vLLM: a template variable
            template_kw["reasoning_effort"] = req.reasoning_effort
        if req.documents is not None:
            template_kw["documents"] = req.documents
        encoder = self.encoder_for(lora)
        engine = self.engine.engine
        images = ChatImages.for_engine(engine, template or encoder.chat_template, encoder)
        messages = self._messages(req, images)
        if getattr(encoder, "is_mistral", False):  # tokenizer_mode="mistral": no template
            return (*self._render_mistral(req, tools, encoder, messages), images)
        try:
            text = encoder.apply_chat_template(
                messages, chat_template=template, tokenize=False, **template_kw,
                add_generation_prompt=req.add_generation_prompt and not
                req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}))
        except APIError:
            raise
        except Exception as e:  # jinja errors, no template, bad kwargs: the request's fault
            hint = "" if template or encoder.chat_template else (
                " (this model's tokenizer has no chat template: start the server with "
                "--chat-template)")
            raise BadRequestError(f"cannot apply the chat template: {e}{hint}",
                                  param="messages") from e
        ids = list(encoder(text, add_special_tokens=req.add_special_tokens).input_ids)
        if images:
            options = self.processor_options(req)
            try:  # (engine/multimodal_processor.py: whichever modalities the model takes)
                ids = engine.image_processor.expanded(ids, images.multi_modal_data(), options)
            except ValueError as e:
                raise BadRequestError(f"messages: {e}", param="messages") from e
        return text, ids, images

    def processor_options(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """The request's mm_processor_kwargs over the server's, checked: a 400 for a key
        the model's processor does not take."""
        try:
            return self.engine.engine.mm_prompts.options(req.mm_processor_kwargs)
        except ValueError as e:
            raise BadRequestError(str(e), param="mm_processor_kwargs") from e

    @staticmethod
    def _render_mistral(req: ChatCompletionRequest, tools: list[dict[str, Any]] | None,
                        encoder: Any, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        """The chat as mistral_common encodes it (engine/mistral_tokenizer.py), and its
        text; a template of the request's is refused, as vLLM refuses it."""
        if req.chat_template is not None or req.chat_template_kwargs is not None:
            raise BadRequestError("chat_template is not supported for Mistral tokenizers "
                                  "(tokenizer_mode 'mistral': mistral_common encodes the chat)",
                                  param="chat_template")
        try:
            ids = encoder.encode_chat(messages, tools,
                                      continue_final_message=req.continue_final_message,
                                      reasoning_effort=req.reasoning_effort)
        except ValueError as e:
            raise BadRequestError(str(e), param="messages") from e
        return encoder.decode(ids), ids

    def process_images(self, ids: list[int], images: ChatImages,
                       options: dict[str, Any] | None = None
                       ) -> tuple[list[int], ImageInputs]:
        """The HF image processing (and Qwen-VL's videos'), on the encoder thread (a big
        image never stalls the engine's steps): the ids and the ImageInputs the engine
        takes as they are. `options`: the request's mm_processor_kwargs (processor_options)."""
        try:  # (engine/multimodal_processor.py: whichever modalities the model takes)
            return self.engine.engine.image_processor.process(
                ids, images.multi_modal_data(), options)
        except ValueError as e:
            raise BadRequestError(f"messages: {e}", param="messages") from e

    async def create_chat_completion(self, req: ChatCompletionRequest,
                                     chunks: bool = False):
        """The response, or for `req.stream` the SSE body; `chunks`: a stream as
        (ChatCompletionStreamResponse objects, the engine requests) instead, for a route
        that re-frames it (/v1/responses)."""
        self.check_unsupported(req)
        calling = tool_mode(req, self.tool_call_parser)
        if req.top_logprobs and not req.logprobs:
            raise BadRequestError("when using `top_logprobs`, `logprobs` must be set to true",
                                  param="top_logprobs")
        limit = self.engine.engine.model_config.max_logprobs
        if req.top_logprobs is not None and (req.top_logprobs < 0 or 0 <= limit <
                                             req.top_logprobs):
            raise BadRequestError(f"top_logprobs must be in [0, {limit}] (the server's "
                                  f"--max-logprobs), got {req.top_logprobs}",
                                  param="top_logprobs")
        lora = await self.models.resolve(req.model)
        model = req.model or self.models.base_model_name
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        params = self.sampling_params(req, max_tokens,
                                      (req.top_logprobs or 0) if req.logprobs else None,
                                      req.prompt_logprobs)
        if calling == "forced":
            if params.structured_outputs is not None:
                raise BadRequestError("tool_choice constrains the reply already: leave out "
                                      "response_format and structured outputs",
                                      param="tool_choice")
            params.structured_outputs = tool_choice_outputs(req)
        elif calling == "auto" and self.tool_parser.keeps_special_tokens:
            params.skip_special_tokens = False  # its call tag is a special token
        if self.reasoning is not None and self.reasoning.keeps_special_tokens:
            params.skip_special_tokens = False  # gpt-oss's harmony markers
        text, ids, images = await self.off_loop(self.render, req,
                                                req.tools if calling else None, lora)
        self.check_token_ids(ids)
        if not images:
            text, ids = self.truncated((text, ids), params)
        # (with images the engine refuses a truncate_prompt_tokens that would cut them)
        self.fit_max_tokens(params, len(ids))
        request_id = req.request_id or random_id("chatcmpl")
        echo = self._echo(req)
        if req.use_beam_search:
            if images:
                raise BadRequestError("use_beam_search does not take images yet",
                                      param="use_beam_search")
            if calling:
                raise BadRequestError("use_beam_search does not call tools: leave out tools "
                                      "or set tool_choice none", param="use_beam_search")
            results = await self.beam_search(req, request_id, params, [(text, ids)], lora)
            return self._beam_response(req, request_id, model, len(ids), results[0], echo)
        inputs = None
        if images:
            ids, inputs = await self.off_loop(self.process_images, ids, images,
                                              self.processor_options(req))
        queued = await self.start_requests(request_id, [(text, ids)], [params], req.model,
                                           lora, req.cache_salt, req.priority, inputs)
        if req.stream:
            stream = self._stream(req, request_id, model, len(ids), queued, echo, calling,
                                  params, lora)
            if chunks:
                return stream, queued
            return self.sse(_as_sse(stream), queued)
        final = await self.final_output(queued)
        choices = []
        for o in final.outputs:
            message, finish = self._reply(req, calling, o.text, o.finish_reason, echo)
            choices.append(ChatCompletionChoice(
                index=o.index, message=message,
                logprobs=self._logprobs(o, 0, req.return_tokens_as_token_ids)
                if req.logprobs else None, finish_reason=finish, stop_reason=o.stop_reason))
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices,
            usage=await self._usage(req, len(ids), final, params, lora),
            prompt_logprobs=self.prompt_logprobs(req, final))

    async def _usage(self, req: ChatCompletionRequest, prompt_tokens: int,
                     final: RequestOutput, params: SamplingParams, lora: LoRARequest | None) -> UsageInfo:
        """The request's usage; with a reasoning parser, the tokens its replies' reasoning
        took (decoded as the replies were, off the event loop)."""
        outputs = final.outputs
        gen = sum(len(o.token_ids) for o in outputs)
        parser = self._reasoning_for(req)
        if parser is None:
            return self.usage(prompt_tokens, gen, final.num_cached_tokens)
        decoder = self.decoder_for(lora)

        def decode(token_ids: list[int]) -> str:
            return decoder.decode(token_ids, skip_special_tokens=params.skip_special_tokens,
                                  clean_up_tokenization_spaces=False)

        reasoning = await self.off_loop(lambda: sum(
            reasoning_token_count(parser, list(o.token_ids), decode)
            for o in outputs))
        return self.usage(prompt_tokens, gen, final.num_cached_tokens, reasoning)

    def _beam_response(self, req: ChatCompletionRequest, request_id: str, model: str,
                       prompt_tokens: int, result: BeamSearchOutput, echo: str
                       ) -> ChatCompletionResponse:
        choices = []
        for j, beam in enumerate(result.sequences):
            message, finish = self._reply(req, None, beam.text, beam.finish_reason, echo)
            choices.append(ChatCompletionChoice(index=j, message=message, finish_reason=finish))
        gen = sum(len(beam.logprobs) for beam in result.sequences)
        return ChatCompletionResponse(
            id=request_id, model=model, choices=choices,
            usage=UsageInfo.of(prompt_tokens, gen))

    def _reply(self, req: ChatCompletionRequest, calling: str | None, text: str,
               finish: str | None, echo: str = "", parser: Any = None
               ) -> tuple[ChatResponseMessage, str | None]:
        """The message (its reasoning apart, with a reasoning parser; tool calls when the
        request called tools and the content has them; an echo goes before the content)
        and its finish_reason ("tool_calls" for a completed call). `parser`: the tool
        parser for the request's tools, when the caller has it already."""
        reasoning, text = self._split(req, text)
        shown = reasoning if req.include_reasoning else None
        thought = {"reasoning": shown, "reasoning_content": shown, "role": self.role(req)}
        content, calls = text, None
        if calling == "forced":
            calls = to_tool_calls(req, text)
            content = None
        elif calling == "auto":
            content, calls = (parser or self.tool_parser.for_request(req.tools)).parse(text)
            if req.parallel_tool_calls is False:
                calls = calls[:1]  # the model's first call; the rest are not made
        if not calls:
            content = echo + text
            return ChatResponseMessage(
                content=None if reasoning is not None and not content else content,
                **thought), finish
        return (ChatResponseMessage(content=(echo + (content or "")) or None, tool_calls=calls,
                                    **thought),
                "tool_calls" if finish == "stop" else finish)

    def role(self, req: ChatCompletionRequest) -> str:
        """The reply's role (vLLM's rule): --response-role for a new message, else that of
        the last message, which the reply continues."""
        if req.add_generation_prompt and not req.continue_final_message:
            return self.response_role
        return req.messages[-1].role

    def _echo(self, req: ChatCompletionRequest) -> str:
        """vLLM's chat echo: the last message's text goes before the reply when it has the
        reply's role (an assistant message being continued)."""
        last = req.messages[-1]
        if not req.echo or last.role != self.role(req):
            return ""
        content = last.content
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content)
        return content or ""

    def _logprobs(self, o: CompletionOutput, start: int, as_ids: bool = False
                  ) -> ChatCompletionLogProbs:
        content = []
        for tok, top in zip(o.token_ids[start:], (o.logprobs or [])[start:]):
            text = self.token_text(tok, top.get(tok), as_ids, o.lora_request)
            tops = [ChatLogProb(token=(t := self.token_text(k, v, as_ids, o.lora_request)),
                                logprob=v.logprob,
                                bytes=list(t.encode()))
                    for k, v in sorted(top.items(), key=lambda kv: -kv[1].logprob)]
            content.append(ChatLogProbsContent(
                token=text, logprob=top[tok].logprob if tok in top else float("-inf"),
                bytes=list(text.encode()), top_logprobs=tops))
        return ChatCompletionLogProbs(content=content)

    @staticmethod
    def _partial_calls(req: ChatCompletionRequest, calling: str, text: str, parser: Any
                       ) -> list[PartialCall]:
        calls = forced_partial(req, text) if calling == "forced" else parser.partial(text)
        return calls[:1] if req.parallel_tool_calls is False else calls

    def _call_id(self) -> str:
        """A streamed call's id: the parser's kind (Mistral's 9 characters) or OpenAI's."""
        return self.tool_parser.call_id() if self.tool_parser else ToolCall.new_id()

    async def _stream(self, req: ChatCompletionRequest, request_id: str, model: str,
                      prompt_tokens: int, queued: EngineRequests, echo: str,
                      calling: str | None, params: SamplingParams,
                      lora: LoRARequest | None) -> AsyncIterator[ChatCompletionStreamResponse]:
        """The stream's chunks; `calling`: the request's tool mode (tool_calls.tool_mode);
        `params`, `lora`: the request's (its usage decodes the replies as they were)."""
        created = int(time.time())

        continuous = self.continuous_usage(req)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None,
                  generated: int = 0, cached: int = 0) -> ChatCompletionStreamResponse:
            """`generated`, `cached`: the usage so far, which continuous_usage_stats puts
            on every chunk (the choice's tokens)."""
            if usage is None and continuous:
                usage = self.usage(prompt_tokens, generated, cached)
            return ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                                choices=choices, usage=usage)

        sent_text: dict[int, int] = {}  # of the content (the reply past its reasoning)
        sent_reasoning: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        sent_calls: dict[int, dict[int, int]] = {}  # choice -> call -> arguments sent
        done: set[int] = set()
        # the tool parser for this request's tools, once (not at every step)
        parser = self.tool_parser.for_request(req.tools) if calling == "auto" else None
        role = self.role(req)
        for i in range(req.n):
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role=role, content=""))])
            if echo:
                yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=echo))])
        async for out in queued.streams[0]:
            self.check_output(out)
            for o in out.outputs:
                if o.index in done:
                    continue
                t0, k0 = sent_text.get(o.index, 0), sent_tokens.get(o.index, 0)
                # the reasoning as it grows (each split extends the last), then the content
                reasoning, text = self._split(req, o.text, o.finish_reason is not None)
                r0 = sent_reasoning.get(o.index, 0)
                thought = (reasoning or "")[r0:] if req.include_reasoning else ""
                # content stops where a tool call may start; calls go out as they are
                # written (tool_calls.call_deltas), the rest of them at the end
                end = len(text) if not calling or o.finish_reason is not None else (
                    0 if calling == "forced" else parser.content_prefix(text))
                delta = text[t0:end]
                sent = sent_calls.setdefault(o.index, {})
                calls = (call_deltas(self._partial_calls(req, calling, text, parser), sent,
                                     parser.call_id if parser else self._call_id)
                         if calling and o.finish_reason is None else [])
                if not delta and not thought and not calls and o.finish_reason is None:
                    continue
                sent_text[o.index], sent_tokens[o.index] = end, len(o.token_ids)
                sent_reasoning[o.index] = r0 + len(thought)
                finish = o.finish_reason
                if finish is not None:
                    done.add(o.index)
                msg = DeltaMessage(content=delta if delta or not (calls or thought) else None,
                                   reasoning=thought or None, reasoning_content=thought or None,
                                   tool_calls=calls or None)
                if calling and finish is not None:
                    reply, finish = self._reply(req, calling, o.text, finish, parser=parser)
                    if reply.tool_calls:  # the content not streamed yet, then the calls
                        msg = DeltaMessage(content=(reply.content or "")[t0:] or None,
                                           reasoning=msg.reasoning,
                                           reasoning_content=msg.reasoning_content,
                                           tool_calls=final_call_deltas(
                                               reply.tool_calls,
                                               self._partial_calls(req, calling, text,
                                                                   parser),
                                               sent))
                yield chunk([ChatStreamChoice(
                    index=o.index, delta=msg,
                    logprobs=self._logprobs(o, k0, req.return_tokens_as_token_ids)
                    if req.logprobs else None,
                    finish_reason=finish, stop_reason=o.stop_reason)],
                    generated=len(o.token_ids), cached=out.num_cached_tokens)
            last = out
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], await self._usage(req, prompt_tokens, last, params, lora))


async def _as_sse(chunks: AsyncIterator[ChatCompletionStreamResponse]) -> AsyncIterator[str]:
    try:
        async for body in chunks:
            yield f"data: {body.model_dump_json()}\n\n"
    finally:
        await chunks.aclose()

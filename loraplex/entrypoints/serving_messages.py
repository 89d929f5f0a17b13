"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, served by
the chat route.

A request becomes a chat request (`system` -> a system message; content blocks -> chat
parts: text, image (a data: URL or the URL given), an assistant's tool_use -> its
tool_calls, a user's tool_result -> a "tool" message; thinking blocks sent back are left
out, as chat templates leave out reasoning; tools and tool_choice auto / any / tool /
none -> chat's; stop_sequences -> stop; thinking -> the template's enable_thinking /
thinking and whether reasoning is shown; vLLM's sampling extras pass through), and the
chat reply becomes a Message: a thinking block (with --reasoning-parser), a text block,
a tool_use block per call (its arguments parsed), stop_reason from chat's finish_reason.
Streamed, the chat chunks are re-framed as Anthropic's events.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from loraplex.entrypoints.anthropic_protocol import (
    AnthropicUsage,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    MessagesResponse,
)
from loraplex.entrypoints.errors import BadRequestError, anthropic_error_body
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
)
from loraplex.entrypoints.serving_chat import OpenAIServingChat
from loraplex.entrypoints.serving_responses import passed_through
from loraplex.entrypoints.tool_calls import tool_mode


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


# ---- the request as a chat request ------------------------------------------------------
def chat_request(req: CountTokensRequest, request_id: str | None = None
                 ) -> ChatCompletionRequest:
    """The chat request that serves `req` (a count_tokens request: its prompt only)."""
    messages = _system(req.system)
    for i, msg in enumerate(req.messages):
        messages += _messages(msg.role, msg.content, i)
    body: dict[str, Any] = {"model": req.model, "messages": messages,
                            "request_id": request_id}
    if req.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.input_schema}}
            for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
            choice.type) or {"type": "function", "function": {"name": choice.name}}
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if req.thinking is not None:
        on = req.thinking.type != "disabled"
        # Qwen3's and GLM's templates read enable_thinking, Granite's and DeepSeek's thinking
        body["chat_template_kwargs"] = {"enable_thinking": on, "thinking": on}
        body["include_reasoning"] = on
    if isinstance(req, MessagesRequest):
        body.update({
            "max_completion_tokens": req.max_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "top_k": req.top_k, "stop": req.stop_sequences,
            "stream": req.stream, "user": (req.metadata or {}).get("user_id"),
            # every chunk carries the usage: message_start has the prompt's tokens
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}
            if req.stream else None})
    extras = passed_through(req)
    if extras.get("n", 1) != 1:
        raise BadRequestError("n: a message is one reply (n must be 1)", param="n")
    if "chat_template_kwargs" in extras and "chat_template_kwargs" in body:
        extras["chat_template_kwargs"] = {**body["chat_template_kwargs"],
                                          **(extras["chat_template_kwargs"] or {})}
    body.update(extras)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise BadRequestError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def _system(system: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`system` (a string or text blocks, joined) as a system message."""
    if not system:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    texts = []
    for j, block in enumerate(system):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequestError(f"system[{j}]: system blocks must be text blocks "
                                  "({'type': 'text', 'text': ...})", param="system")
        texts.append(block["text"])
    return [{"role": "system", "content": "".join(texts)}]


def _messages(role: str, content: str | list[dict[str, Any]], i: int
              ) -> list[dict[str, Any]]:
    """Message i as chat messages: a user's tool results each a "tool" message (first,
    as Anthropic puts them first), then the rest of it."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, where))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, where))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # the model's earlier thinking: chat templates leave it out
        else:
            allowed = ("text, image, tool_result" if role == "user" else
                       "text, tool_use, thinking")
            raise BadRequestError(f"{where}: a block of type {kind!r} is not valid in a "
                                  f"{role} message (blocks: {allowed}; text blocks need a "
                                  "string `text`)", param="messages")
    out = results
    if parts or calls or not results:
        msg: dict[str, Any] = {"role": role, "content": _joined(parts)}
        if calls:
            msg["tool_calls"] = calls
            msg["content"] = msg["content"] or None
        out.append(msg)
    return out


def _joined(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts as one string (as chat gets a plain message); with images, the parts."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _image_url(block: dict[str, Any], where: str) -> str:
    """An image block's source as the URL chat's image_url takes."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(
            source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise BadRequestError(f"{where}: an image block's source must be {{'type': 'base64', "
                          "'media_type': ..., 'data': ...}} or {'type': 'url', 'url': ...}",
                          param="messages")


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    name, call_id, args = block.get("name"), block.get("id"), block.get("input", {})
    if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, dict):
        raise BadRequestError(f"{where}: a tool_use block needs an `id`, a `name` and an "
                              "object `input`", param="messages")
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A tool_result as chat's "tool" message; its content a string or text blocks."""
    call_id, content = block.get("tool_use_id"), block.get("content", "")
    if not isinstance(call_id, str):
        raise BadRequestError(f"{where}: a tool_result block needs `tool_use_id`",
                              param="messages")
    if isinstance(content, list):
        if not all(isinstance(b, dict) and b.get("type") == "text" and
                   isinstance(b.get("text"), str) for b in content):
            raise BadRequestError(f"{where}: a tool_result's content must be a string or text "
                                  "blocks (images in tool results are not supported)",
                                  param="messages")
        content = "\n".join(b["text"] for b in content)
    elif not isinstance(content, str):
        raise BadRequestError(f"{where}: a tool_result's content must be a string or text "
                              "blocks", param="messages")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# ---- the chat reply as a Message ---------------------------------------------------------
def stop_reason(finish: str | None, stop: int | str | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence from chat's finish_reason and stop_reason
    (a matched stop string; a stop token id or EOS: the turn's end)."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def thinking_block(text: str) -> dict[str, Any]:
    """A thinking block; its signature a digest of the text (Anthropic's clients want one,
    and send it back; it proves nothing here)."""
    return {"type": "thinking", "thinking": text, "signature": _signature(text)}


def _signature(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments (JSON text, as chat has them) as a tool_use block's input; a
    call cut short by max_tokens: what its text holds so far, read as the anthropic SDK's
    stream helper reads partial JSON (an unfinished string or key left out)."""
    try:
        value = from_json(arguments, allow_partial=True) if arguments.strip() else {}
    except ValueError:
        value = {}
    return value if isinstance(value, dict) else {"value": value}


def content_blocks(message: ChatResponseMessage) -> list[dict[str, Any]]:
    blocks = [thinking_block(message.reasoning)] if message.reasoning else []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks += [{"type": "tool_use", "id": c.id, "name": c.function.name,
                "input": tool_input(c.function.arguments)} for c in message.tool_calls]
    return blocks


def event(kind: str, **fields: Any) -> str:
    """One SSE event with its `event:` line, as Anthropic's SDKs read them."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"


def error_event(message: str, status: int) -> str:
    return f"event: error\ndata: {json.dumps(anthropic_error_body(message, status))}\n\n"


class ServingMessages:
    def __init__(self, chat: OpenAIServingChat) -> None:
        self.chat = chat

    async def create_message(self, req: MessagesRequest):
        """The Message, or for `req.stream` its SSE body of events."""
        msg_id = message_id()
        chat_req = chat_request(req, msg_id)
        if not req.stream:
            reply = await self.chat.create_chat_completion(chat_req)
            choice = reply.choices[0]
            reason, sequence = stop_reason(choice.finish_reason, choice.stop_reason)
            return MessagesResponse(
                id=msg_id, content=content_blocks(choice.message), model=req.model,
                stop_reason=reason, stop_sequence=sequence,
                usage=AnthropicUsage(input_tokens=reply.usage.prompt_tokens,
                                     output_tokens=reply.usage.completion_tokens))
        chunks, queued = await self.chat.create_chat_completion(chat_req, chunks=True)
        return self.chat.sse(_events(msg_id, req.model, chunks), queued,
                             error_event=error_event, done="")

    async def count_tokens(self, req: CountTokensRequest) -> CountTokensResponse:
        """The prompt's tokens as the chat route renders it for the engine (the tools in
        the template when the request would call them)."""
        chat_req = chat_request(req)
        calling = tool_mode(chat_req, self.chat.tool_call_parser)
        lora = await self.chat.models.resolve(req.model)
        _, ids, _ = await self.chat.off_loop(self.chat.render, chat_req,
                                             chat_req.tools if calling else None, lora)
        return CountTokensResponse(input_tokens=len(ids))


async def _events(msg_id: str, model: str,
                  chunks: AsyncIterator[ChatCompletionStreamResponse]) -> AsyncIterator[str]:
    """The chat chunks as Anthropic's events: message_start, each block's start, deltas
    and stop (a ping after the first start), message_delta (stop_reason, usage),
    message_stop."""
    blocks = _Blocks()
    finish, stop, usage, started = None, None, None, False
    try:
        async for chunk in chunks:
            if not started:  # the first chunk (continuous usage: it has the prompt's)
                started = True
                head = MessagesResponse(id=msg_id, content=[], model=model, stop_reason=None,
                                        usage=AnthropicUsage(
                                            input_tokens=chunk.usage.prompt_tokens
                                            if chunk.usage else 0, output_tokens=0))
                yield event("message_start", message=head.model_dump())
            usage = chunk.usage or usage
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                stop = choice.stop_reason if choice.stop_reason is not None else stop
                for e in blocks.add(choice.delta.reasoning, choice.delta.content,
                                    choice.delta.tool_calls):
                    yield e
    finally:
        await chunks.aclose()
    for e in blocks.close():
        yield e
    reason, sequence = stop_reason(finish, stop)
    yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                usage={"output_tokens": usage.completion_tokens if usage else 0})
    yield event("message_stop")


class _Blocks:
    """The content blocks of a streamed message as they grow, and their events."""

    def __init__(self) -> None:
        self.count = 0  # blocks started
        self._open: str | None = None  # "thinking" | "text" | "tool_use", the last block's
        self._thinking = ""
        self._calls: set[int] = set()  # the chat tool calls' indices seen

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self.close()
        events.append(event("content_block_start", index=self.count, content_block=block))
        if self.count == 0:
            events.append(event("ping"))
        self.count += 1
        self._open = block["type"]
        return events

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", index=self.count - 1, delta=delta)

    def add(self, reasoning: str | None, content: str | None, calls: list | None
            ) -> list[str]:
        events: list[str] = []
        if reasoning:
            if self._open != "thinking":
                events += self._start({"type": "thinking", "thinking": "", "signature": ""})
                self._thinking = ""
            self._thinking += reasoning
            events.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        if content:
            if self._open != "text":
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": content}))
        for call in calls or []:
            if call.index not in self._calls:
                self._calls.add(call.index)
                events += self._start({"type": "tool_use", "id": call.id or "",
                                       "name": call.function.name or "", "input": {}})
            if call.function.arguments:
                events.append(self._delta({"type": "input_json_delta",
                                           "partial_json": call.function.arguments}))
        return events

    def close(self) -> list[str]:
        """Stop the open block (a thinking block gets its signature first)."""
        if self._open is None:
            return []
        events = []
        if self._open == "thinking":
            events.append(self._delta({"type": "signature_delta",
                                       "signature": _signature(self._thinking)}))
        self._open = None
        events.append(event("content_block_stop", index=self.count - 1))
        return events

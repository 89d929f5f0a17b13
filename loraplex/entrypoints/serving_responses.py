"""POST /v1/responses: OpenAI's Responses API, served by the chat route.

A request becomes a chat request (instructions -> a system message, input items ->
messages, function tools and tool_choice reshaped, text.format -> response_format,
max_output_tokens -> max_completion_tokens; vLLM's sampling extras pass through), and the
chat reply becomes output items: a `reasoning` item (with --reasoning-parser), a
`message` with its `output_text` (and its tokens' logprobs with include=
["message.output_text.logprobs"]), a `function_call` per tool call. Streamed, the chat
chunks are re-framed as the API's events (response.created, output_item.added,
output_text.delta, ..., response.completed). With LORAPLEX_ENABLE_RESPONSES_API_STORE
(off by default, as vLLM's), responses are kept in memory (LRU) so that a request can
continue one (previous_response_id: its conversation, output included, goes before the
new input) and GET /v1/responses/{id} returns one; off, the whole conversation goes in
`input`, as with chat.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from loraplex.entrypoints.errors import BadRequestError, NotFoundError
from loraplex.entrypoints.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
    UsageInfo,
    random_id,
)
from loraplex.entrypoints.serving_chat import OpenAIServingChat

_TEXT_PARTS = ("input_text", "output_text", "text")


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as chat messages."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    return [m for i, item in enumerate(req.input) for m in _messages(item, i)]


def chat_request(req: ResponsesRequest, history: list[dict[str, Any]] | None = None
                 ) -> ChatCompletionRequest:
    """The chat request that serves `req`; `history`: the conversation of the response it
    continues (previous_response_id), before its input. Instructions are not inherited
    (OpenAI's rule)."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += (history or []) + input_messages(req)
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "stream": req.stream,
        "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "user": req.user,
        "tools": [_tool(t, i) for i, t in enumerate(req.tools)] if req.tools else None,
        "tool_choice": _tool_choice(req.tool_choice) if req.tools else None,
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req.text),
        "stream_options": {"include_usage": True} if req.stream else None,
        "reasoning_effort": (req.reasoning or {}).get("effort"),
        "logprobs": req.wants_logprobs(),
        "top_logprobs": req.top_logprobs if req.wants_logprobs() else None,
    }
    body.update(passed_through(req))
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise BadRequestError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def passed_through(req: BaseModel) -> dict[str, Any]:
    """The request's fields unknown to its API (the Responses API's, the Messages API's)
    that chat takes (vLLM's sampling extras: top_k, seed, logit_bias, ignore_eos,
    structured_outputs, ...)."""
    chat_fields = ChatCompletionRequest.model_fields
    return {k: v for k, v in (req.model_extra or {}).items()
            if k in chat_fields and k not in ("messages", "stream", "stream_options")}


def _messages(item: Any, i: int) -> list[dict[str, Any]]:
    """One input item as chat messages (a reasoning item: none; templates drop them)."""
    if not isinstance(item, dict):
        raise BadRequestError(f"input[{i}] must be an object", param="input")
    kind = item.get("type", "message")
    if kind == "message":
        role = {"developer": "system"}.get(item.get("role"), item.get("role"))
        if role not in ("system", "user", "assistant"):
            raise BadRequestError(f"input[{i}]: role {item.get('role')!r} is not one of user, "
                                  "system, developer, assistant", param="input")
        return [{"role": role, "content": _content(item.get("content"), i)}]
    if kind == "function_call":
        return [{"role": "assistant", "content": None, "tool_calls": [{
            "id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}]}]
    if kind == "function_call_output":
        output = item.get("output")
        return [{"role": "tool", "tool_call_id": item.get("call_id"),
                 "content": output if isinstance(output, str) else json.dumps(output)}]
    if kind == "reasoning":
        return []
    raise BadRequestError(f"input[{i}]: items of type {kind!r} are not supported (message, "
                          "function_call, function_call_output, reasoning)", param="input")


def _content(content: Any, i: int) -> str | list[dict[str, Any]]:
    """A message's content for chat: its text parts joined, or, with an `input_image`
    part, chat's parts (an `image_url` each; the chat route decodes and refuses them)."""
    if isinstance(content, str) or content is None:
        return content or ""
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind in _TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(part, i)}})
        else:
            raise BadRequestError(f"input[{i}]: content part of type {kind!r} is not "
                                  "supported (input_text, output_text, input_image)",
                                  param="input")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _image_url(part: dict[str, Any], i: int) -> str:
    """An input_image part's URL: OpenAI's shape (and vLLM's) is a string, a data: or
    http(s) URL; a file_id needs a files API there is none of."""
    url = part.get("image_url")
    if not isinstance(url, str):
        what = "file_id" if part.get("file_id") is not None else "image_url"
        raise BadRequestError(f"input[{i}]: an input_image part needs image_url, a data: or "
                              f"http(s) URL string ({what} given as "
                              f"{type(part.get(what)).__name__})", param="input")
    return url


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """A Responses function tool (flat) as a chat one (under "function")."""
    if tool.get("type") != "function":
        raise BadRequestError(f"tools[{i}]: tools of type {tool.get('type')!r} are not "
                              "supported (function tools only)", param="tools")
    return {"type": "function", "function": {
        k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or "name" not in choice:
            raise BadRequestError(f"tool_choice {choice!r} is not supported: auto, none, "
                                  "required or a function by name", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {"type": "text"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    if fmt.get("type") in ("json_object", "text"):
        return None if fmt["type"] == "text" else {"type": "json_object"}
    raise BadRequestError(f"text.format type {fmt.get('type')!r} is not supported (text, "
                          "json_object, json_schema)", param="text")


# ---- output items --------------------------------------------------------------------
def reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or random_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def message_item(text: str, status: str = "completed", item_id: str | None = None,
                 logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": item_id or random_id("msg"), "role": "assistant",
            "status": status,
            "content": [output_text(text, logprobs)] if status != "in_progress" else []}


def token_logprobs(logprobs: ChatCompletionLogProbs | None) -> list[dict[str, Any]]:
    """Chat's logprobs as an output_text's: the same fields (token, logprob, bytes,
    top_logprobs)."""
    return [lp.model_dump() for lp in (logprobs.content or [])] if logprobs else []


def function_call_item(call_id: str, name: str, arguments: str, status: str = "completed",
                       item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or random_id("fc"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the assistant message a later turn sees (reasoning
    left out, as chat templates leave it out)."""
    text = "".join(part["text"] for item in items if item["type"] == "message"
                   for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call"]
    if not text and not calls:
        return []
    return [{"role": "assistant", "content": text or None, **({"tool_calls": calls}
                                                                 if calls else {})}]


def response_status(finish_reason: str | None) -> str:
    """A response's status from its reply's finish_reason: max_output_tokens reached is
    "incomplete" (OpenAI's word), anything else "completed"."""
    return "incomplete" if finish_reason == "length" else "completed"


def output_items(message: ChatResponseMessage, status: str,
                 logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`logprobs`: those of the reply's tokens, on its message's text (as vLLM, the whole
    reply's: with a reasoning parser, the reasoning's tokens too)."""
    items = [reasoning_item(message.reasoning)] if message.reasoning is not None else []
    if message.content:
        items.append(message_item(message.content, status, logprobs=logprobs))
    items += [function_call_item(c.id, c.function.name, c.function.arguments)
              for c in message.tool_calls]
    return items


@dataclass
class _Stored:
    messages: list[dict[str, Any]]  # the conversation, its output included
    response: ResponsesResponse


class OpenAIServingResponses:
    def __init__(self, chat: OpenAIServingChat, store_size: int = 0) -> None:
        """`store_size`: how many responses to keep for previous_response_id and
        GET /v1/responses/{id} (LRU, in memory; 0: none, vLLM's default)."""
        self.chat = chat
        self.store_size = store_size
        self._stored: OrderedDict[str, _Stored] = OrderedDict()

    async def create_response(self, req: ResponsesRequest):
        """The response, or for `req.stream` its SSE body of events."""
        history = self._history(req.previous_response_id)
        chat_req = chat_request(req, history)
        response_id, created = random_id("resp"), int(time.time())
        model = req.model or self.chat.models.base_model_name
        if not req.stream:
            reply = await self.chat.create_chat_completion(chat_req)
            choice = reply.choices[0]
            status = response_status(choice.finish_reason)
            output = output_items(choice.message, status, token_logprobs(choice.logprobs))
            response = self._response(req, response_id, created, model, status, output,
                                      reply.usage)
            self._remember(req, history, response)
            return response
        chunks, queued = await self.chat.create_chat_completion(chat_req, chunks=True)
        return self.chat.sse(self._events(req, response_id, created, model, chunks, history),
                             queued)

    def retrieve(self, response_id: str) -> ResponsesResponse:
        """GET /v1/responses/{response_id}: a stored response (404 otherwise)."""
        stored = self._stored.get(response_id)
        if stored is None:
            raise NotFoundError(f"Response with id {response_id!r} not found" + (
                "" if self.store_size else " (this server stores none: set "
                "LORAPLEX_ENABLE_RESPONSES_API_STORE=1)"))
        return stored.response

    def _history(self, previous: str | None) -> list[dict[str, Any]]:
        """The conversation a request continues (none without previous_response_id)."""
        if not previous:
            return []
        if not self.store_size:
            raise BadRequestError("previous_response_id: this server stores no responses "
                                  "(set LORAPLEX_ENABLE_RESPONSES_API_STORE=1); send the whole "
                                  "conversation in `input`", param="previous_response_id")
        stored = self._stored.get(previous)
        if stored is None:
            raise NotFoundError(f"Previous response with id {previous!r} not found (never "
                                "stored, stored with store=false, or evicted)")
        self._stored.move_to_end(previous)
        return stored.messages

    def _remember(self, req: ResponsesRequest, history: list[dict[str, Any]],
                  response: ResponsesResponse) -> None:
        if not self.store_size or req.store is False:
            return
        response.store = True
        messages = history + input_messages(req) + output_messages(response.output)
        self._stored[response.id] = _Stored(messages, response)
        while len(self._stored) > self.store_size:
            self._stored.popitem(last=False)

    @staticmethod
    def _response(req: ResponsesRequest, response_id: str, created: int, model: str,
                  status: str, output: list[dict[str, Any]],
                  usage: UsageInfo | None) -> ResponsesResponse:
        return ResponsesResponse(
            id=response_id, created_at=created, model=model, status=status, output=output,
            usage=usage and ResponseUsage(
                input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                input_tokens_details={"cached_tokens": usage.cached_tokens},
                output_tokens_details=usage.completion_tokens_details
                or {"reasoning_tokens": 0}),  # no reasoning parser: none is told apart
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, tools=req.tools or [],
            tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls,
            text=req.text or {"format": {"type": "text"}}, metadata=req.metadata,
            reasoning=req.reasoning)

    async def _events(self, req: ResponsesRequest, response_id: str, created: int,
                      model: str, chunks: AsyncIterator[ChatCompletionStreamResponse],
                      history: list[dict[str, Any]]) -> AsyncIterator[str]:
        """The chat chunks as the API's events, each item opened when its first piece
        comes and closed (with its whole text) when the next item starts or the reply
        ends."""
        stream = _EventStream()
        head = self._response(req, response_id, created, model, "in_progress", [], None)
        yield stream.event("response.created", response=head.model_dump())
        yield stream.event("response.in_progress", response=head.model_dump())
        usage, finish = None, None
        try:
            async for chunk in chunks:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    delta = choice.delta
                    for event in stream.add(delta.reasoning, delta.content, delta.tool_calls,
                                            token_logprobs(choice.logprobs)):
                        yield event
        finally:
            await chunks.aclose()
        status = response_status(finish)
        for event in stream.close(status):
            yield event
        final = self._response(req, response_id, created, model, status, stream.items, usage)
        self._remember(req, history, final)
        yield stream.event(f"response.{status}", response=final.model_dump())


class _EventStream:
    """The output items of a streamed response as they grow, and their events."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._seq = itertools.count()
        self._open: str | None = None  # "reasoning" | "message" | "call", the last item's
        self._text = ""
        self._logprobs: list[dict[str, Any]] = []  # the open message's tokens'
        self._calls: dict[int, dict[str, Any]] = {}  # a chat tool call's index -> its item

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": next(self._seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def _start(self, kind: str, item: dict[str, Any]) -> list[str]:
        events = self.close("completed")
        self.items.append(item)
        self._open, self._text, self._logprobs = kind, "", []
        events.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                 item=item))
        if kind == "message":
            events.append(self.event("response.content_part.added", content_index=0,
                                     part=output_text(""), **self._where()))
        return events

    def add(self, reasoning: str | None, content: str | None, calls: list | None,
            logprobs: list[dict[str, Any]]) -> list[str]:
        """A chat chunk's pieces; `logprobs`: its tokens', which go with its content."""
        events: list[str] = []
        if reasoning:
            if self._open != "reasoning":
                item = reasoning_item("")
                item["content"], item["status"] = [], "in_progress"
                events += self._start("reasoning", item)
            self._text += reasoning
            events.append(self.event("response.reasoning_text.delta", content_index=0,
                                     delta=reasoning, **self._where()))
        if content:
            if self._open != "message":
                events += self._start("message", message_item("", "in_progress"))
            self._text += content
            self._logprobs += logprobs
            events.append(self.event("response.output_text.delta", content_index=0,
                                     delta=content, logprobs=logprobs, **self._where()))
        for call in calls or []:
            if call.index not in self._calls:
                item = function_call_item(call.id or "", call.function.name or "", "",
                                          "in_progress")
                events += self._start("call", item)
                self._calls[call.index] = item
            pieces = call.function.arguments if call.function else None
            if pieces:
                self._text += pieces
                events.append(self.event("response.function_call_arguments.delta",
                                         delta=pieces, **self._where()))
        return events

    def close(self, status: str) -> list[str]:
        """Close the open item with its whole text (none open: nothing)."""
        kind, text = self._open, self._text
        if kind is None:
            return []
        self._open, item, where = None, self.items[-1], self._where()
        if kind == "reasoning":
            item.update(reasoning_item(text, item["id"]))
            events = [self.event("response.reasoning_text.done", content_index=0, text=text,
                                 **where)]
        elif kind == "message":
            item.update(message_item(text, status, item["id"], self._logprobs))
            events = [self.event("response.output_text.done", content_index=0, text=text,
                                 logprobs=self._logprobs, **where),
                      self.event("response.content_part.done", content_index=0,
                                 part=output_text(text, self._logprobs), **where)]
        else:
            item.update(arguments=text, status="completed")
            events = [self.event("response.function_call_arguments.done", arguments=text,
                                 name=item["name"], **where)]
        events.append(self.event("response.output_item.done", output_index=where["output_index"],
                                 item=item))
        return events

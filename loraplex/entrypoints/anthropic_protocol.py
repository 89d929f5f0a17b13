"""Request and response bodies of Anthropic's Messages API (/v1/messages).

Content blocks stay dicts: serving_messages.py checks each one and names the bad one in
its 400. Unknown fields are accepted (vLLM's sampling extras among them: ignore_eos,
seed, guided_choice, ... pass on to the chat request; the rest are named in a warning).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AnthropicBase(BaseModel):
    model_config = ConfigDict(extra="allow")


class AnthropicMessage(AnthropicBase):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(AnthropicBase):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(AnthropicBase):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool to call
    disable_parallel_tool_use: bool | None = None


class AnthropicThinking(AnthropicBase):
    type: Literal["enabled", "adaptive", "disabled"]  # adaptive: as enabled
    budget_tokens: int | None = None  # accepted, not enforced


class CountTokensRequest(AnthropicBase):
    """What /v1/messages/count_tokens renders: the prompt's part of a messages request."""

    model: str
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # its user_id is chat's `user`


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]]  # text, thinking and tool_use blocks
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class CountTokensResponse(BaseModel):
    input_tokens: int

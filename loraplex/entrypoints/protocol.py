"""Request and response bodies of the OpenAI-compatible server (OpenAI's shapes + vLLM's extras).

Unknown request fields are accepted and ignored (as vLLM does, which logs a warning naming
them: see ``ignored_fields``), so newer OpenAI clients keep working; fields we cannot
honour are rejected with a 400 in the serving layer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


_INT64 = (-(2**63), 2**63 - 1)  # torch generator seeds (vLLM's bounds)


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of a request that no model here declares."""
    found = [prefix + k for k in body.model_extra or {}]
    for name in type(body).model_fields:
        value = getattr(body, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, BaseModel):
                found += ignored_fields(item, f"{prefix}{name}{'' if i is None else f'[{i}]'}.")
    return found


# ---- errors -----------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- models -----------------------------------------------------------------------------
class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: random_id("modelperm"))
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---- shared -----------------------------------------------------------------------------
class StreamOptions(OpenAIBase):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # OpenAI's {"cached_tokens": n}, the prompt tokens read from the prefix cache: with
    # --enable-prompt-tokens-details (vLLM's flag), else None
    prompt_tokens_details: dict[str, int] | None = None
    # OpenAI's {"reasoning_tokens": n}: with a reasoning parser (reasoning.py), else None
    completion_tokens_details: dict[str, int] | None = None
    # the cached count whether shown or not: the Responses API always reports it
    _cached_tokens: int = PrivateAttr(0)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int,
           reasoning_tokens: int | None = None, cached_tokens: int = 0,
           show_cached: bool = False) -> UsageInfo:
        usage = cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                    prompt_tokens_details={"cached_tokens": cached_tokens} if show_cached
                    else None,
                    completion_tokens_details=None if reasoning_tokens is None
                    else {"reasoning_tokens": reasoning_tokens})
        usage._cached_tokens = cached_tokens
        return usage

    @property
    def cached_tokens(self) -> int:
        return self._cached_tokens


XArg = str | int | float  # a vllm_xargs value (or a list of them), vLLM's types


class SamplingFields(OpenAIBase):
    """Sampling fields common to both endpoints; names and defaults follow vLLM."""

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = Field(None, ge=_INT64[0], le=_INT64[1])
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:<id>"
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None  # prefix-cache sharing only between equal salts
    priority: int = 0  # lower is served earlier (--scheduling-policy priority only)
    use_beam_search: bool = False  # n beams, best first (loraplex/beam_search.py)
    length_penalty: float = 1.0  # beam search: score = logprob / length ** this
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs object and
    # its older guided_* fields (at most one of them)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's: arguments for custom logits processors (SamplingParams.extra_args);
    # loraplex_xargs is the same field by loraplex's name (both given: merged)
    vllm_xargs: dict[str, XArg | list[XArg]] | None = None
    loraplex_xargs: dict[str, XArg | list[XArg]] | None = None

    def extra_args(self) -> dict[str, Any] | None:
        merged = {**(self.vllm_xargs or {}), **(self.loraplex_xargs or {})}
        return merged or None


# ---- completions ------------------------------------------------------------------------
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    # vLLM's: prompts as embeddings, base64 of torch.save bytes (--enable-prompt-embeds);
    # answered before the text prompts' choices
    prompt_embeds: str | list[str] | None = None
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True
    prompt_logprobs: int | None = None  # vLLM extra: each prompt token's logprob + top-k


class PromptLogprob(BaseModel):
    """vLLM's Logprob as its server writes it in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)

    def __add__(self, other: CompletionLogProbs) -> CompletionLogProbs:
        """One token list after another (an echoed prompt's, then the generated ones)."""
        return CompletionLogProbs(text_offset=self.text_offset + other.text_offset,
                                  token_logprobs=self.token_logprobs + other.token_logprobs,
                                  tokens=self.tokens + other.tokens,
                                  top_logprobs=self.top_logprobs + other.top_logprobs)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM extra, with prompt_logprobs: per prompt token (the first: None), token id -> logprob
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- chat -------------------------------------------------------------------------------
class ChatMessage(OpenAIBase):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: which call it answers


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = True  # false: at most one call per reply
    # OpenAI's; the chat template reads it (gpt-oss's: "Reasoning: low")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # vLLM extras
    include_reasoning: bool = True  # False: a reply's reasoning is left out (usage counts it)
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: options of the model's processor for this request's images, over the
    # server's --mm-processor-kwargs (Gemma 3's {"do_pan_and_scan": true})
    mm_processor_kwargs: dict[str, Any] | None = None
    # vLLM's: retrieved documents for a RAG chat template (its `documents` variable)
    documents: list[dict[str, str]] | None = None
    prompt_logprobs: int | None = None


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: ToolCall.new_id())
    type: Literal["function"] = "function"
    function: FunctionCall

    @staticmethod
    def new_id() -> str:
        return random_id("chatcmpl-tool")


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call (OpenAI's shape): the first piece of a call has its
    id, type and name, the later ones more of its arguments' text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    # a reasoning model's thinking (--reasoning-parser): vLLM's `reasoning`, and its older
    # name `reasoning_content`, which clients still read
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    # vLLM extra, with prompt_logprobs: per prompt token (the first: None), id -> logprob
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None  # as in ChatResponseMessage
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- embeddings -------------------------------------------------------------------------
class EmbeddingRequest(OpenAIBase):
    """OpenAI's embeddings request: `input` a string, a list of strings, a list of token
    ids or a list of such lists; or, vLLM's chat-style one, `messages`: one conversation
    rendered by the chat template, one embedding."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # matryoshka models only
    user: str | None = None
    # vLLM extras
    messages: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False  # (messages) vLLM's default for embeddings
    continue_final_message: bool = False
    # None: True for `input`, False for `messages` (the template writes them), as vLLM
    add_special_tokens: bool | None = None
    normalize: bool | None = None  # None: the model's pooler config
    truncate_prompt_tokens: int | None = None  # keep each input's last k tokens (-1: as
    # many as max_model_len allows)
    priority: int = 0
    request_id: str | None = None


class EmbeddingResponseData(BaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str  # a str: base64 of the little-endian float32 values


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0  # vLLM reports it too


class EmbeddingResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("embd"))
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingResponseData]
    usage: EmbeddingUsage


# ---- classification (a *ForSequenceClassification checkpoint's) ------------------------------
class ClassificationRequest(OpenAIBase):
    """vLLM's /classify: `input` a string, a list of strings, a list of token ids or a
    list of such lists; one classification each."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = None
    # vLLM extras
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep each input's last k tokens
    priority: int = 0
    request_id: str | None = None


class ClassificationData(BaseModel):
    index: int
    label: str | None  # id2label of the most probable class
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("classify"))
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: EmbeddingUsage


# ---- scores (an embedding model's: cosine similarity) ----------------------------------------
class ScoreRequest(OpenAIBase):
    """vLLM's /score: text_1 against text_2, 1:1, 1:N or N:N."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    request_id: str | None = None


class ScoreResponseData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("score"))
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankRequest(OpenAIBase):
    """vLLM's /rerank (Jina's and Cohere's shape): the documents by relevance to the
    query; top_n of them (0: all)."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int = 0
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    request_id: str | None = None


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: random_id("rerank"))
    model: str
    usage: RerankUsage
    results: list[RerankResult]


# ---- adapters ---------------------------------------------------------------------------
class LoadLoRAAdapterRequest(OpenAIBase):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False
    base_model_name: str | None = None


class UnloadLoRAAdapterRequest(OpenAIBase):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


# ---- responses (OpenAI's Responses API, /v1/responses) ------------------------------------
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"


class ResponsesRequest(OpenAIBase):
    """The Responses API's request; the chat route serves it (serving_responses.py), and
    vLLM's sampling extras (top_k, seed, logit_bias, structured_outputs, ...) pass through
    to it."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" |
    # "json_schema", ...}}
    reasoning: dict[str, Any] | None = None  # its effort: the chat's reasoning_effort
    store: bool | None = None  # accepted; nothing is stored
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    # "message.output_text.logprobs": each output_text's tokens' logprobs (other
    # includables are accepted and have nothing to add here)
    include: list[str] | None = None
    top_logprobs: int | None = None  # alternatives per token, with the include above

    def wants_logprobs(self) -> bool:
        return OUTPUT_TEXT_LOGPROBS in (self.include or [])


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]  # {"cached_tokens": n}, from the prefix cache
    output_tokens_details: dict[str, int] = Field(  # chat's completion_tokens_details
        default_factory=lambda: {"reasoning_tokens": 0})


class ResponsesResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: str  # "completed" | "incomplete" | "in_progress"
    output: list[dict[str, Any]] = Field(default_factory=list)  # OpenAI's output items
    usage: ResponseUsage | None = None
    incomplete_details: dict[str, str] | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    truncation: str = "disabled"


# ---- tokenization (vLLM's /tokenize and /detokenize) ------------------------------------
class TokenizeRequest(OpenAIBase):
    """A `prompt`, or chat `messages` rendered through the chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # (messages) as the chat route's
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBase):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str

"""POST /v1/embeddings: inputs (text or token ids, one or many) -> one embedding each;
or vLLM's chat-style request, `messages` rendered by the chat template -> one.

Each input is one pooling request on the engine, under the adapter `model` names (or the
base), all queued before any runs, so the inputs of one call (and of concurrent calls,
whatever their adapter) share forwards.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import torch

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    ChatCompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
    EmbeddingUsage,
    random_id,
)
from loraplex.entrypoints.serving_base import OpenAIServing
from loraplex.entrypoints.serving_chat import OpenAIServingChat
from loraplex.entrypoints.serving_utils import merge_async_iterators
from loraplex.lora.request import LoRARequest
from loraplex.outputs import PoolingRequestOutput
from loraplex.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    def __init__(self, *args: Any, chat: OpenAIServingChat | None = None, **kw: Any) -> None:
        """`chat`: whose chat template (and encoder thread) render `messages`."""
        super().__init__(*args, **kw)
        self.chat = chat

    def _inputs(self, req: EmbeddingRequest, lora: LoRARequest | None,
                params: PoolingParams) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per input, with `lora`'s tokenizer when it adds tokens, and
        truncated as asked (then without text); on the encoder thread."""
        add = True if req.add_special_tokens is None else req.add_special_tokens
        out = self.encode_items(req.input, lora, add, "input")
        return self.checked(out, params)

    def checked(self, out: list[tuple[str | None, list[int]]], params: PoolingParams,
                param: str = "input") -> list[tuple[str | None, list[int]]]:
        """Each input truncated as asked (then without text) and within max_model_len
        (`param`: the field an error names)."""
        out = [self.truncated(item, params) for item in out]
        for _, ids in out:
            self._check_length(ids, param)
        return out

    async def _conversation(self, req: EmbeddingRequest, lora: LoRARequest | None
                            ) -> tuple[str, list[int]]:
        """vLLM's chat-style embeddings: the messages rendered by the chat template
        (the request's, else the server's), on the chat route's encoder thread."""
        if self.chat is None:
            raise BadRequestError("messages are not supported here: send input",
                                  param="messages")
        chat = ChatCompletionRequest(
            messages=req.messages, chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=bool(req.add_special_tokens))
        text, ids, images = await self.chat.off_loop(self.chat.render, chat, None, lora)
        if images:
            raise BadRequestError("image inputs are not supported for embeddings",
                                  param="messages")
        return text, ids

    def _check_length(self, ids: list[int], param: str = "input") -> None:
        if not ids:
            raise BadRequestError("an input is empty", param=param)
        if len(ids) >= self.max_model_len:  # vLLM's words
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(ids)} tokens in the input for embedding "
                "generation. Please reduce the length of the input.", param=param)

    def _params(self, req: EmbeddingRequest) -> PoolingParams:
        try:
            params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                                   truncate_prompt_tokens=req.truncate_prompt_tokens)
        except ValueError as e:
            raise BadRequestError(str(e), param=str(e).split(" ", 1)[0]) from e
        try:
            self.engine.engine.check_dimensions(params.dimensions)
        except ValueError as e:
            raise BadRequestError(str(e), param="dimensions") from e
        return params

    async def embed(self, request_id: str, inputs: list[tuple[str | None, list[int]]],
                    params: PoolingParams, model: str | None, lora: LoRARequest | None,
                    priority: int = 0, param: str = "input") -> list[torch.Tensor]:
        """One pooling request per input, all queued before any runs (under `lora`): their
        vectors in input order. `param`: the field the engine's prompt checks name."""
        try:
            queued = await self.start_requests(request_id, inputs, [params] * len(inputs),
                                               model, lora, None, priority)
        except BadRequestError as e:
            if e.param == "prompt":  # the engine's checks name a prompt; here, `param`
                e.param = param
            raise
        finals: dict[int, PoolingRequestOutput] = {}
        try:
            async for i, out in merge_async_iterators(*queued.streams):
                finals[i] = out
        finally:
            await self.abort_all(queued)
        for i in range(len(inputs)):
            self.check_output(finals[i])
        return [finals[i].outputs.data for i in range(len(inputs))]

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        params = self._params(req)
        lora = await self.models.resolve(req.model)
        model = req.model or self.models.base_model_name
        if (req.input is None) == (req.messages is None):
            raise BadRequestError("give exactly one of input and messages", param="input")
        if req.messages is not None:
            inputs = self.checked([await self._conversation(req, lora)], params)
        else:
            inputs = await self.off_loop(self._inputs, req, lora, params)
        request_id = req.request_id or random_id("embd")
        vectors = await self.embed(request_id, inputs, params, req.model, lora, req.priority)
        data = [EmbeddingResponseData(index=i, embedding=_encode(v, req.encoding_format))
                for i, v in enumerate(vectors)]
        n = sum(len(ids) for _, ids in inputs)
        return EmbeddingResponse(id=request_id, model=model, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n))


def _encode(vector, encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: a list of floats, or base64 of the float32 values (little
    endian, as numpy.frombuffer(..., dtype=float32) reads them: the openai client asks
    for base64 by default and decodes it so)."""
    values = vector.tolist()
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values

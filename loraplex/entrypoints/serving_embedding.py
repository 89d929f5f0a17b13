"""POST /v1/embeddings: inputs (text or token ids, one or many) -> one embedding each.

Each input is one pooling request on the engine, under the adapter `model` names (or the
base), all queued before any runs, so the inputs of one call (and of concurrent calls,
whatever their adapter) share forwards.
"""

from __future__ import annotations

import base64
import struct

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
    EmbeddingUsage,
    random_id,
)
from loraplex.entrypoints.serving_base import OpenAIServing
from loraplex.entrypoints.serving_utils import merge_async_iterators
from loraplex.lora.request import LoRARequest
from loraplex.outputs import PoolingRequestOutput
from loraplex.pooling_params import PoolingParams


class OpenAIServingEmbedding(OpenAIServing):
    def _inputs(self, req: EmbeddingRequest, lora: LoRARequest | None,
                params: PoolingParams) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) per input, with `lora`'s tokenizer when it adds tokens, and
        truncated as asked (then without text); on the encoder thread."""
        out = self.encode_items(req.input, lora, req.add_special_tokens, "input")
        for k, (_, ids) in enumerate(out):
            kept = params.truncate_prompt(ids, self.max_model_len)
            if len(kept) != len(ids):
                out[k] = (None, kept)
            self._check_length(out[k][1])
        return out

    def _check_length(self, ids: list[int]) -> None:
        if not ids:
            raise BadRequestError("an input is empty", param="input")
        if len(ids) >= self.max_model_len:  # vLLM's words
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(ids)} tokens in the input for embedding "
                "generation. Please reduce the length of the input.", param="input")

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

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        params = self._params(req)
        lora = await self.models.resolve(req.model)
        model = req.model or self.models.base_model_name
        inputs = await self.off_loop(self._inputs, req, lora, params)
        request_id = req.request_id or random_id("embd")
        try:
            queued = await self.start_requests(request_id, inputs, [params] * len(inputs),
                                               req.model, lora, None, req.priority)
        except BadRequestError as e:
            if e.param == "prompt":  # the engine's checks name a prompt; here it is input
                e.param = "input"
            raise
        finals: dict[int, PoolingRequestOutput] = {}
        try:
            async for i, out in merge_async_iterators(*queued.streams):
                finals[i] = out
        finally:
            await self.abort_all(queued)
        data = []
        for i in range(len(inputs)):
            self.check_output(finals[i])
            vector = finals[i].outputs.data
            data.append(EmbeddingResponseData(index=i, embedding=_encode(vector,
                                                                         req.encoding_format)))
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

"""POST /score and /rerank (vLLM's), under the adapter `model` names, through the
embeddings route's path (every engine request queued before any runs): an embedding
model's texts each embedded, each pair scored by the cosine similarity of its embeddings;
a cross-encoder's (a one-label classifier's) pairs each one input, scored by the
classifier (loraplex/scoring.py). /rerank is the same with one query against the
documents, sorted by score."""

from __future__ import annotations

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
    UsageInfo,
    random_id,
)
from loraplex.entrypoints.serving_embedding import OpenAIServingEmbedding
from loraplex.lora.request import LoRARequest
from loraplex.pooling_params import PoolingParams
from loraplex.scoring import (
    cosine_scores,
    cross_encoder_ids,
    pair_indices,
    truncation_length,
)


class OpenAIServingScores:
    def __init__(self, embedding: OpenAIServingEmbedding) -> None:
        self.embedding = embedding  # its encoder thread, checks and engine requests
        self.models = embedding.models

    async def create_score(self, req: ScoreRequest) -> ScoreResponse:
        first = [req.text_1] if isinstance(req.text_1, str) else req.text_1
        second = [req.text_2] if isinstance(req.text_2, str) else req.text_2
        request_id = req.request_id or random_id("score")
        scores, tokens = await self._scores(request_id, req.model, first, second,
                                            req.truncate_prompt_tokens, req.priority,
                                            "text_1")
        return ScoreResponse(
            id=request_id, model=req.model or self.models.base_model_name,
            data=[ScoreResponseData(index=i, score=s) for i, s in enumerate(scores)],
            usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        if req.top_n < 0:
            raise BadRequestError(f"top_n must be >= 0 (0: all), got {req.top_n}",
                                  param="top_n")
        request_id = req.request_id or random_id("rerank")
        scores, tokens = await self._scores(request_id, req.model, [req.query],
                                            req.documents, req.truncate_prompt_tokens,
                                            req.priority, "documents")
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        results = [RerankResult(index=i, document=RerankDocument(text=req.documents[i]),
                                relevance_score=scores[i])
                   for i in order[:req.top_n or len(order)]]
        return RerankResponse(id=request_id, model=req.model or self.models.base_model_name,
                              usage=RerankUsage(total_tokens=tokens), results=results)

    async def _scores(self, request_id: str, model: str | None, first: list[str],
                      second: list[str], truncate: int | None, priority: int, param: str
                      ) -> tuple[list[float], int]:
        """Each pair's score, and the prompt tokens run."""
        try:
            pairs = pair_indices(len(first), len(second))
            params = PoolingParams(truncate_prompt_tokens=truncate)
        except ValueError as e:
            raise BadRequestError(str(e), param=param) from e
        if any(not isinstance(t, str) for t in first + second):
            raise BadRequestError("texts must be strings", param=param)
        lora = await self.models.resolve(model)
        serving = self.embedding
        if serving.engine.engine.classify:  # a cross-encoder
            inputs = await serving.off_loop(self._pair_inputs, first, second, pairs, lora,
                                            truncate, param)
            outs = await serving.embed(request_id, inputs, PoolingParams(task="score"),
                                       model, lora, priority, param)
            return [float(v[0]) for v in outs], sum(len(ids) for _, ids in inputs)
        inputs = await serving.off_loop(self._inputs, first + second, lora, params, param)
        vectors = await serving.embed(request_id, inputs, params, model, lora, priority,
                                      param)
        scores = cosine_scores(vectors[:len(first)], vectors[len(first):], pairs)
        return scores, sum(len(ids) for _, ids in inputs)

    def _inputs(self, texts: list[str], lora: LoRARequest | None, params: PoolingParams,
                param: str) -> list[tuple[str | None, list[int]]]:
        """On the encoder thread: each text's ids, truncated as asked, within
        max_model_len."""
        serving = self.embedding
        return serving.checked(serving.encode_items(texts, lora, True, param), params, param)

    def _pair_inputs(self, first: list[str], second: list[str], pairs: list[tuple[int, int]],
                     lora: LoRARequest | None, truncate: int | None, param: str
                     ) -> list[tuple[str | None, list[int]]]:
        """On the encoder thread: each pair's one input (scoring.cross_encoder_ids, with
        `lora`'s tokenizer when it adds tokens), within max_model_len."""
        serving = self.embedding
        encoder = serving.encoder_for(lora)
        max_length = truncation_length(truncate, serving.max_model_len)
        use_pad = serving.engine.engine.use_pad_token
        items: list[tuple[str | None, list[int]]] = [
            (None, cross_encoder_ids(encoder, first[i], second[j], use_pad, max_length))
            for i, j in pairs]
        return serving.checked(items, PoolingParams(), param)

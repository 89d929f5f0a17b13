"""POST /classify (vLLM's): inputs (text or token ids, one or many) -> each one's class
probabilities and most probable label, from a `*ForSequenceClassification` checkpoint
under the adapter `model` names (its own head when it has one, else the base's).

The embeddings route's path (OpenAIServingEmbedding.embed): every input one pooling
request, all queued before any runs; the engine applies the head (layers/classifier.py).
"""

from __future__ import annotations

from loraplex.entrypoints.errors import BadRequestError
from loraplex.entrypoints.protocol import (
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    EmbeddingUsage,
    random_id,
)
from loraplex.entrypoints.serving_embedding import OpenAIServingEmbedding
from loraplex.pooling_params import PoolingParams


class OpenAIServingClassification:
    def __init__(self, embedding: OpenAIServingEmbedding) -> None:
        self.embedding = embedding

    async def create_classify(self, req: ClassificationRequest) -> ClassificationResponse:
        emb = self.embedding
        try:
            params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens)
        except ValueError as e:
            raise BadRequestError(str(e), param="truncate_prompt_tokens") from e
        lora = await emb.models.resolve(req.model)
        model = req.model or emb.models.base_model_name
        items = await emb.off_loop(emb.encode_items, req.input, lora,
                                   req.add_special_tokens, "input")
        inputs = emb.checked(items, params)
        request_id = req.request_id or random_id("classify")
        probs = await emb.embed(request_id, inputs, params, req.model, lora, req.priority)
        engine = emb.engine.engine
        data = [ClassificationData(index=i, label=engine.pooling.label(int(p.argmax())),
                                   probs=p.tolist(), num_classes=p.numel())
                for i, p in enumerate(probs)]
        n = sum(len(ids) for _, ids in inputs)
        return ClassificationResponse(id=request_id, model=model, data=data,
                                      usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n))

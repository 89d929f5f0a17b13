"""What a pooling runner needs beside the model: the pooler config the checkpoint and the
user agree on, and for a classifier its head (the base's, and an adapter's own
`modules_to_save` one), the activations of its logits, its labels and the token it scores.

LLMEngine queues a pooling request as one prefill-only sequence; when its prompt is all
computed, `output` turns the pooled hidden state into the request's result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.config import ModelConfig, PoolerConfig
from loraplex.layers.classifier import ClassifierHead, read_adapter_head
from loraplex.layers.classifier_activation import classify_activation, score_activation
from loraplex.layers.pooler import embedding_head
from loraplex.lora.manager import LoRAManager
from loraplex.lora.request import LoRARequest
from loraplex.models.lm_head_classifier import LMHeadClassifier
from loraplex.models.pooling_defaults import resolve_pooler_config
from loraplex.pooling_params import PoolingParams


def check_dimensions(mc: ModelConfig, dimensions: int | None, hidden_size: int) -> None:
    """vLLM's matryoshka rule: other output dimensions only on a model trained for them
    (config.json's is_matryoshka / matryoshka_dimensions), within its size."""
    if dimensions is None:
        return
    if not mc.is_matryoshka:
        raise ValueError(f'dimensions: model "{mc.name}" does not support matryoshka '
                         "representation, changing output dimensions will lead to poor "
                         "results.")
    if mc.matryoshka_dimensions and dimensions not in mc.matryoshka_dimensions:
        raise ValueError(f'dimensions: model "{mc.name}" only supports '
                         f"{list(mc.matryoshka_dimensions)} matryoshka dimensions, got "
                         f"{dimensions}")
    if not 1 <= dimensions <= hidden_size:
        raise ValueError(f"dimensions must be in [1, {hidden_size}] (the model's hidden "
                         f"size), got {dimensions}")


@dataclass
class PoolingHeads:
    classify: bool  # a *ForSequenceClassification checkpoint (or a converted causal LM)
    lm_head_classifier: LMHeadClassifier | None  # its head from lm_head rows (hf_overrides)
    id2label: dict[int, str]
    pad_token_id: int | None  # config.json's: a classifier scores the last token but it
    activations: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    head: ClassifierHead | None = None  # the base's (classify), set once the model loads
    # (lora_int_id, registration) -> the adapter's own head, or None: the base's
    _adapter_heads: dict[tuple[int, int], ClassifierHead | None] = field(default_factory=dict)

    @classmethod
    def configure(cls, hf_config: Any, mc: ModelConfig, path: str) -> PoolingHeads:
        """Settle mc.pooler_config: a classifier pools its last token unnormalized (HF's);
        an embedding model takes the user's fields over the checkpoint's defaults. Refuses
        what cannot work, before the model loads."""
        lm_head_classifier = LMHeadClassifier.from_config(hf_config)
        classify = mc.pooling_task == "classify"
        activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if classify:
            asked = mc.pooler_config
            if asked is not None and (asked.pooling_type not in (None, "LAST")
                                      or asked.normalize or asked.dimensions):
                raise ValueError("a classifier pools its last token, unnormalized: "
                                 "pooler_config cannot change that")
            mc.pooler_config = PoolerConfig(pooling_type="LAST", normalize=False)
            activations = {"classify": classify_activation(hf_config),
                           "score": score_activation(hf_config)}
        elif lm_head_classifier is not None:
            raise ValueError("classifier_from_token makes a classifier's head: hf_overrides' "
                             "architectures must name a *ForSequenceClassification one "
                             f"(not {hf_config.architectures}) and the runner be pooling")
        elif mc.runner == "pooling":
            mc.pooler_config = resolve_pooler_config(path, mc.pooler_config)
            check_dimensions(mc, mc.pooler_config.dimensions, hf_config.hidden_size)
        id2label = {int(k): str(v)
                    for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
        return cls(classify, lm_head_classifier, id2label,
                   getattr(hf_config, "pad_token_id", None), activations)

    def set_head(self, head: ClassifierHead | None, where: str) -> None:
        """The base's head, read with the weights (or made from lm_head rows)."""
        if head is None:
            raise ValueError(f"{where}: a classifier checkpoint without score.weight")
        self.head = head
        if head.num_labels != len(self.id2label):
            self.id2label = {}  # labels unnamed: their indices (see label())

    def random_head(self, hf_config: Any, seed: int) -> None:
        """load_format="dummy": a random head of the config's shape, as the decoder's."""
        gen = torch.Generator().manual_seed(seed)
        self.head = ClassifierHead(0.02 * torch.randn(
            hf_config.num_labels, hf_config.hidden_size, generator=gen))

    def head_from_lm_head(self, model: Any, vocab: dict[str, int]) -> None:
        """A converted causal LM's head (models/lm_head_classifier.py) from its lm_head
        weight (the embedding's when tied), tokens looked up in the tokenizer."""
        assert self.lm_head_classifier is not None
        weight = getattr(model.lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or not weight.dtype.is_floating_point or weight.element_size() < 2:
            raise ValueError("classifier_from_token needs a plain (unquantized) lm_head")
        self.head = self.lm_head_classifier.head(weight, vocab)

    def check_request(self, params: PoolingParams) -> None:
        if self.classify and params.normalize:  # not silently ignored
            raise ValueError("normalize: a classifier's output is its class probabilities; "
                             "there is no embedding to normalize")

    def position(self, ids: list[int]) -> int | None:
        """The token a classifier scores (None: an embedding pools by its pooling type).
        HF's classifiers score the last token that is not config.json's pad_token_id
        (the first when all are), so a prompt ending in it is scored as HF does. A
        converted causal LM scores the last token, as the LM predicts the next one."""
        if not self.classify:
            return None
        pad = None if self.lm_head_classifier is not None else self.pad_token_id
        return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad), 0) \
            if pad is not None else len(ids) - 1

    def head_of(self, lora_request: LoRARequest | None,
                lora_manager: LoRAManager | None) -> ClassifierHead:
        """The request's classifier head: its adapter's own (modules_to_save score /
        classifier, read once per registration into host memory), else the base's."""
        assert self.head is not None, "not a classifier"
        if lora_request is None or lora_manager is None:
            return self.head
        lid = lora_request.lora_int_id
        key = (lid, lora_manager.registration_of(lid))
        if key not in self._adapter_heads:
            for old in [k for k in self._adapter_heads if k[0] == lid]:
                del self._adapter_heads[old]  # an earlier registration of this id
            self._adapter_heads[key] = read_adapter_head(lora_manager.registered[lid],
                                                         self.head)
        return self._adapter_heads[key] or self.head

    def output(self, pooled: torch.Tensor, params: PoolingParams, pooler: PoolerConfig,
               lora_request: LoRARequest | None, lora_manager: LoRAManager | None
               ) -> torch.Tensor:
        """A request's result from its pooled hidden state: a classifier's activated
        logits (its score's activation for a score), else the embedding."""
        if self.classify:
            logits = self.head_of(lora_request, lora_manager).logits(pooled)
            return self.activations["score" if params.task == "score" else "classify"](logits)
        return embedding_head(
            pooled, pooler.normalize if params.normalize is None else params.normalize,
            params.dimensions if params.dimensions is not None else pooler.dimensions)

    def check_score(self) -> None:
        """vLLM's refusal of scores from a classifier of several labels (a cross-encoder
        has one: its score)."""
        if self.classify and self.head.num_labels != 1:
            raise ValueError("Score API is only enabled for num_labels == 1 (this "
                             f"classifier has {self.head.num_labels})")

    def label(self, index: int) -> str:
        """id2label of a class index (its index as text when the config names none)."""
        return self.id2label.get(index, str(index))

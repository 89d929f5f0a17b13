"""Sequence classification (vLLM's classify): a `*ForSequenceClassification` checkpoint's
score head on the last token's final normed hidden state, per request; the task's
activation on its logits (layers/classifier_activation.py).

HF's classifiers score the last non-pad token; an unpadded prompt's last token is that
one, so the pooling runner's LAST pooling (no normalization) feeds the head. The head is
tiny ([num_labels, hidden]) and applied on the host to each finished request's pooled
vector, so every request may use its adapter's own trained head (PEFT SEQ_CLS adapters
save it as modules_to_save) or else the base's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.lora.request import LoRARequest

# the names HF's classifiers give their head (modules_to_save of a PEFT SEQ_CLS adapter)
CLASSIFIER_HEADS = ("score", "classifier")
# what PEFT (0.22+) lists in every SEQ_CLS adapter's modules_to_save besides: DistilBERT's
# pre_classifier, which no decoder LLM has, so nothing is saved under it (a tensor there
# would be refused as unexpected)
LISTED_NOT_SAVED = ("pre_classifier",)
# PEFT's saved head: base_model.model.score.weight (or ...score.modules_to_save.X.weight)
_HEAD_KEY = re.compile(r"^(?:.*\.)?(?P<head>score|classifier)"
                       r"(?:\.modules_to_save\.[^.]+)?\.(?P<param>weight|bias)$")


def is_classifier_key(key: str) -> bool:
    """An adapter tensor of its classifier head (not a LoRA A/B)."""
    return _HEAD_KEY.match(key) is not None


@dataclass
class ClassifierHead:
    """A head's weight [num_labels, hidden] (and bias, if any), fp32 on the CPU."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> ClassifierHead | None:
        """The head among a checkpoint's / adapter's tensors; None without one."""
        found: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            m = _HEAD_KEY.match(key)
            if m is not None:
                if m.group("param") in found:
                    raise ValueError(f"{where}: several classifier heads ({key})")
                found[m.group("param")] = tensor.detach().float().cpu()
        if not found:
            return None
        if "weight" not in found or found["weight"].dim() != 2:
            raise ValueError(f"{where}: the classifier head has no 2-D weight")
        return cls(found["weight"], found.get("bias"))

    @property
    def num_labels(self) -> int:
        return self.weight.shape[0]

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled @ W.T + b, fp32 on the CPU; the task's activation makes them the output
        (layers/classifier_activation.py)."""
        if pooled.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"the classifier head takes {self.weight.shape[1]} features, "
                             f"the model's hidden size is {pooled.shape[-1]}")
        logits = pooled.float().cpu() @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        return logits


def read_adapter_head(req: LoRARequest, base: ClassifierHead) -> ClassifierHead | None:
    """The adapter's own trained head (PEFT SEQ_CLS: modules_to_save score, saved as
    base_model.model.score.weight), None without one; its shape must be the base's."""
    from loraplex.lora.adapter import _read_tensors, resolve_adapter_path
    from loraplex.lora.errors import LoRAError

    name = req.lora_name
    try:
        head = ClassifierHead.from_tensors(
            _read_tensors(name, resolve_adapter_path(req)), f"LoRA adapter {name!r}")
    except ValueError as e:
        raise LoRAError(str(e)) from e
    if head is not None and (head.weight.shape != base.weight.shape
                             or (head.bias is None) != (base.bias is None)):
        raise LoRAError(f"LoRA adapter {name!r}: its classifier head has shape "
                        f"{tuple(head.weight.shape)}, the model's {tuple(base.weight.shape)}")
    return head

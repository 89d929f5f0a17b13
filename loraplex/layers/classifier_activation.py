"""What turns a classifier head's logits into its output, per task, as vLLM's
ClassifierPooler does:

classify: by the config's `problem_type` (transformers' loss for it): regression ->
  the logits as they are; multi_label_classification -> sigmoid; otherwise sigmoid for
  one label, softmax over several.
score (a cross-encoder's pair): the sentence-transformers activation the checkpoint names
  (config.json's `sentence_transformers.activation_fn`, or the older
  `sbert_ce_default_activation_function`; only torch.nn.modules classes, as vLLM allows),
  else sigmoid for one label (sentence-transformers' CrossEncoder default), softmax over
  several.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


def _by_labels(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] < 2:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def classify_activation(hf_config: Any) -> Activation:
    """vLLM's get_classification_activation_function."""
    problem = getattr(hf_config, "problem_type", None)
    if problem == "regression":
        return _identity
    if problem == "multi_label_classification":
        return torch.sigmoid
    return _by_labels


def score_activation(hf_config: Any) -> Activation:
    """vLLM's get_cross_encoder_activation_function; a name outside torch.nn.modules, or
    one that does not resolve, fails here (at start-up)."""
    st = getattr(hf_config, "sentence_transformers", None)
    name = st.get("activation_fn") if isinstance(st, dict) else None
    name = name or getattr(hf_config, "sbert_ce_default_activation_function", None)
    if name is None:
        return _by_labels
    if not isinstance(name, str) or not name.startswith("torch.nn.modules."):
        raise ValueError(f"activation function {name!r}: only torch.nn.modules classes are "
                         "loaded (e.g. torch.nn.modules.activation.Sigmoid)")
    module, _, cls = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), cls)()
    except (ImportError, AttributeError, TypeError) as e:
        raise ValueError(f"activation function {name!r} cannot be loaded: {e}") from e
    return fn

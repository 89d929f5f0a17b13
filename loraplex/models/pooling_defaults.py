"""A pooling runner's PoolerConfig defaults, from the checkpoint's sentence-transformers
files when it has them (as vLLM reads them), else LAST + normalize (vLLM's default for
decoder embedding models: e5-mistral, gte-Qwen2).

modules.json lists the pipeline: its `sentence_transformers.models.Pooling` module's
config.json (e.g. 1_Pooling/config.json) names the pooling mode, and a
`sentence_transformers.models.Normalize` module means the embeddings are normalized.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from loraplex.config import PoolerConfig

_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# 1_Pooling/config.json's flags -> our pooling type
_MODES = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
          "pooling_mode_cls_token": "CLS"}
_UNSUPPORTED_MODES = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens")


def sentence_transformers_pooling(path: str) -> PoolerConfig | None:
    """The pooling the checkpoint's modules.json describes; None without one."""
    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        return None
    with open(modules_file) as f:
        modules = json.load(f)
    normalize = any(m.get("type") == _NORMALIZE_MODULE for m in modules)
    pooling = next((m for m in modules if m.get("type") == _POOLING_MODULE), None)
    if pooling is None:
        return PoolerConfig(normalize=normalize)
    with open(os.path.join(path, pooling.get("path", ""), "config.json")) as f:
        cfg = json.load(f)
    odd = [k for k in _UNSUPPORTED_MODES if cfg.get(k)]
    if odd:
        raise ValueError(f"{modules_file}: pooling mode {odd[0]} is not supported (LAST, "
                         "MEAN and CLS are); set pooler_config to override it")
    modes = [ours for key, ours in _MODES.items() if cfg.get(key)]
    if len(modes) > 1:
        raise ValueError(f"{modules_file}: several pooling modes ({', '.join(modes)}) at once "
                         "are not supported; set pooler_config to pick one")
    return PoolerConfig(pooling_type=modes[0] if modes else None, normalize=normalize)


def resolve_pooler_config(path: str, override: PoolerConfig | None) -> PoolerConfig:
    """The user's fields, then the checkpoint's sentence-transformers ones, then LAST +
    normalize."""
    out = PoolerConfig(pooling_type="LAST", normalize=True)
    for layer in (sentence_transformers_pooling(path), override):
        if layer is not None:
            out = replace(out, **{k: v for k, v in vars(layer).items() if v is not None})
    return out

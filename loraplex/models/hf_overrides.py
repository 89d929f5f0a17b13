"""vLLM's `hf_overrides`: keys merged into the checkpoint's HF config before anything is
built from it (the architecture, the model, the engine's limits).

It is how a checkpoint is served as something its config.json does not say, e.g. a causal
LM as a reranker (`architectures`, `classifier_from_token`: models/lm_head_classifier.py),
or a config value corrected without editing the files. A key naming a nested config
(`text_config`) with a dict updates that config's keys, as vLLM merges them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from loraplex.config import json_object


def parse_hf_overrides(value: dict | str | None) -> dict[str, Any]:
    """The overrides as a dict: a dict as is, or its JSON text; a clear error for
    anything else."""
    return json_object("hf_overrides", value, " of config keys")


def apply_hf_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> None:
    """Each key set on `config` (in place); a nested config updated key by key."""
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"hf_overrides: {key!r} is not a config key")
        current = getattr(config, key, None)
        if isinstance(current, PretrainedConfig) and isinstance(value, dict):
            apply_hf_overrides(current, value)
        else:
            setattr(config, key, value)

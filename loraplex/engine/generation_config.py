"""The model's generation_config.json (vLLM's --generation-config): its end-of-sequence
ids and the sampling defaults its authors chose.

Chat models often end a turn with a token the tokenizer does not call eos (Gemma 3's
<end_of_turn>, Llama 3's <|eot_id|>): generation_config.json lists it, and a reply stops
there. Its temperature / top_p / top_k / min_p / repetition_penalty become the defaults
of requests that leave them unset (over HTTP, and `LLM.get_default_sampling_params()`),
and max_new_tokens the default max_tokens where a request gives none, as in vLLM.
`generation_config="vllm"` ignores the file; a folder reads that folder's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field
SAMPLING_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                     "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: frozenset[int] = frozenset()
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> value

    @classmethod
    def read(cls, model_path: str, mode: str = "auto") -> GenerationDefaults:
        """`mode`: "auto" (the model's file), "vllm" (none), or a folder holding one."""
        if mode == "vllm":
            return cls()
        folder = model_path if mode == "auto" else mode
        path = os.path.join(folder, "generation_config.json")
        if not os.path.isfile(path):
            if mode != "auto":
                raise ValueError(f"generation_config={mode!r}: no generation_config.json there")
            return cls()
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        eos = raw.get("eos_token_id")
        eos_ids = frozenset([eos] if isinstance(eos, int) else eos or [])
        sampling = {ours: raw[key] for key, ours in SAMPLING_DEFAULTS.items()
                    if raw.get(key) is not None}
        if sampling:
            logger.info("sampling defaults from %s (requests that set them keep theirs): %s",
                        path, sampling)
        return cls(eos_ids, sampling)

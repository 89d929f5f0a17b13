"""LoRARequest: which adapter a request runs with (vLLM's shape)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class LoRARequest:
    """Names one adapter for one request.

    ``lora_int_id`` is the adapter's identity inside the engine (must be >= 1 and
    unique per adapter); ``lora_path`` is a local PEFT directory or a Hugging Face
    hub id. ``lora_local_path`` is the older spelling of ``lora_path`` and still works.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: str | None = field(default=None, repr=False, compare=False, kw_only=True)
    base_model_name: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.lora_local_path:
            warnings.warn(
                "LoRARequest(lora_local_path=...) is deprecated; use lora_path=...",
                DeprecationWarning,
                stacklevel=3,
            )
            if not self.lora_path:
                self.lora_path = self.lora_local_path
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r} needs a lora_path")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    def __hash__(self) -> int:
        return hash((self.lora_name, self.lora_int_id, self.lora_path))

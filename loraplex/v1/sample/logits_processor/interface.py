"""vLLM V1's batch-level logits processor interface, for processors written against it.

A processor sees the sampled rows of each step as a persistent batch: a request keeps
its row index from step to step; `update_state` tells it which rows were added, removed
(left empty) and moved (the batch condensed), then `apply` gets the [rows, vocab] logits
in that order (engine/logits_processors.py keeps the indices).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loraplex.config import EngineConfig
    from loraplex.sampling_params import SamplingParams


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()  # a -> b, a left empty
    SWAP = auto()  # a <-> b


# (index, params, prompt token ids, output token ids: a live list, grown by the engine)
AddedRequest = tuple[int, "SamplingParams", list[int] | None, list[int]]
# (from index, to index, directionality)
MovedRequest = tuple[int, int, MoveDirectionality]
RemovedRequest = int  # an index left empty (not refilled by an added request)


@dataclass(frozen=True)
class BatchUpdate:
    """A step's changes to the batch. Apply them in vLLM's order: added (an added row may
    take an index a removed one left), then removed, then moved."""

    batch_size: int  # rows after the update
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """A batch-level logits processor (vLLM's `vllm.v1.sample.logits_processor`)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raise ValueError when a request's params (its extra_args) are bad for this
        processor: that request fails alone when it is added."""
        return None

    @abstractmethod
    def __init__(self, vllm_config: EngineConfig, device: torch.device,
                 is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] fp32 logits in the batch's row order -> the processed logits
        (in place or new)."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True when it never changes a row's argmax: it then runs after temperature and
        only matters to random rows; False: it runs before greedy rows take their argmax."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Called every step before apply; None when the batch did not change."""
        raise NotImplementedError

"""vLLM V1's custom logits processors (`vllm.v1.sample.logits_processor`): the interface
user code subclasses. Loading and row bookkeeping: engine/logits_processors.py."""

from loraplex.v1.sample.logits_processor.builtin import (
    AdapterLogitsProcessor,
    RequestLogitsProcessor,
    process_dict_updates,
)
from loraplex.v1.sample.logits_processor.interface import (
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
    MovedRequest,
    RemovedRequest,
)

__all__ = ["AdapterLogitsProcessor", "AddedRequest", "BatchUpdate", "LogitsProcessor",
           "MoveDirectionality", "MovedRequest", "RemovedRequest", "RequestLogitsProcessor",
           "process_dict_updates"]

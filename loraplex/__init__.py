"""loraplex: many LoRA adapters on one base LLM, with vLLM's API."""

from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from loraplex.entrypoints.llm import LLM
from loraplex.lora.request import LoRARequest
from loraplex.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "CompletionOutput", "EmbeddingOutput", "EmbeddingRequestOutput",
           "EngineArgs", "LLMEngine", "LoRARequest", "PoolingOutput", "PoolingParams",
           "PoolingRequestOutput", "RequestOutput", "SamplingParams", "ScoringOutput",
           "ScoringRequestOutput", "__version__"]

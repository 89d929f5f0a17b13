"""loraplex: many LoRA adapters on one base LLM, with vLLM's API."""

from loraplex.engine.arg_utils import AsyncEngineArgs, EngineArgs
from loraplex.engine.async_engine import AsyncLLMEngine
from loraplex.engine.llm_engine import LLMEngine
from loraplex.entrypoints.llm import LLM
from loraplex.inputs import EmbedsPrompt, PromptType, TextPrompt, TokensPrompt
from loraplex.lora.request import LoRARequest
from loraplex.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
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
from loraplex.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncEngineArgs", "AsyncLLMEngine", "BeamSearchParams",
           "ClassificationOutput", "ClassificationRequestOutput", "CompletionOutput",
           "EmbedsPrompt", "EmbeddingOutput", "EmbeddingRequestOutput", "EngineArgs", "LLMEngine",
           "LoRARequest", "PoolingOutput", "PoolingParams", "PoolingRequestOutput",
           "PromptType", "RequestOutput", "SamplingParams", "ScoringOutput",
           "ScoringRequestOutput", "TextPrompt", "TokensPrompt", "__version__"]

"""A pooling runner's requests (embed, classify, score; vLLM's PoolingParams): one
prefill-only sequence each, checked at add_request, whose prompt's hidden states are
pooled as its prefill completes (the step calls `_finish_pooling`) and turned into the
request's result by engine/pooling_heads.py's PoolingHeads.

A mixin of LLMEngine (engine/llm_engine.py); it reads the engine's attributes named below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplex.config import ModelConfig
from loraplex.engine.pooling_heads import PoolingHeads, check_dimensions
from loraplex.engine.prompt_checks import cache_salt, check_prompt
from loraplex.engine.request import Request
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.inputs import PromptType
from loraplex.layers.pooler import PoolingState
from loraplex.lora.manager import LoRAManager
from loraplex.lora.request import LoRARequest
from loraplex.pooling_params import PoolingParams


class PoolingRequests:
    """LLMEngine's pooling side: a pooling request in, its pooled output out."""

    model_config: ModelConfig
    model: Any
    pooling: PoolingHeads
    classify: bool
    lora_manager: LoRAManager | None
    requests: dict[str, Request]
    scheduler: Scheduler
    _use_lora: Callable[[LoRARequest], int]  # engine/lora_admin.py's
    _tokenize: Callable[..., tuple[str | None, list[int]]]  # engine/prompt_inputs.py's
    get_tokenizer: Callable[..., Any]
    vocab_size: Callable[..., int]

    def check_dimensions(self, dimensions: int | None) -> None:
        """An embedding request's `dimensions`: within the model's matryoshka sizes."""
        check_dimensions(self.model_config, dimensions, self.model.args.hidden_size)


    def _add_pooling_request(self, request_id: str, prompt: PromptType,
                             params: PoolingParams, lora_request: LoRARequest | None,
                             priority: int) -> None:
        """One prefill-only sequence that pools its prompt's hidden states."""
        self.pooling.check_request(params)
        self.check_dimensions(params.dimensions)
        lora_id = self._use_lora(lora_request) if lora_request is not None else 0
        text, ids = self._tokenize(prompt, self.get_tokenizer(lora_request))
        ids = params.truncate_prompt(ids, self.model_config.max_model_len)
        cache_salt(prompt)  # checked; pooling takes nothing from the prefix cache
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            raise ValueError("multi_modal_data: image inputs are not supported for pooling")
        check_prompt(ids, self.vocab_size(lora_request), self.model_config.max_model_len)
        seq = Sequence(request_id, 0, ids, params, lora_id, None, priority)
        seq.pooling = PoolingState(self.model_config.pooler_config.pooling_type,
                                   self.pooling.position(ids))
        if self.classify:  # read now: a bad head fails this request alone
            self.pooling.head_of(lora_request, self.lora_manager)
        self.requests[request_id] = Request(request_id, text, ids, params, lora_request,
                                            [seq], [])
        self.scheduler.add(seq)

    def _finish_pooling(self, prefill: list[Sequence], touched: dict[str, Request]) -> None:
        """Pooling sequences whose prompt is all computed: their embedding, and done."""
        pc = self.model_config.pooler_config
        for seq in prefill:
            if seq.pooling is None or seq.num_computed_tokens < seq.num_tokens:
                continue
            req = self.requests[seq.request_id]
            req.pooled = self.pooling.output(seq.pooling.pooled(), req.params, pc,
                                             req.lora_request, self.lora_manager)
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
            touched[req.request_id] = req


"""vLLM's public names, used as vLLM's users use them: `TextPrompt` / `TokensPrompt`
prompts, and `AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))` streaming requests for
different adapters at once. Each must give what the offline LLM gives for the same prompt
and adapter (which tests/test_engine_parity.py holds against HF + PEFT)."""

from __future__ import annotations

import asyncio

import loraplex
from loraplex import (
    AsyncEngineArgs,
    AsyncLLMEngine,
    LoRARequest,
    SamplingParams,
    TextPrompt,
    TokensPrompt,
)
from tests.engine_utils import GREEDY, make_llm

TEXT = "The quick brown fox"


def test_vllm_top_level_names_are_exported():
    """The names a vLLM script imports from `vllm` itself."""
    for name in ("LLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs",
                 "SamplingParams", "PoolingParams", "BeamSearchParams", "LoRARequest",
                 "RequestOutput", "CompletionOutput", "PoolingOutput", "PoolingRequestOutput",
                 "EmbeddingOutput", "EmbeddingRequestOutput", "ClassificationOutput",
                 "ClassificationRequestOutput", "ScoringOutput", "ScoringRequestOutput",
                 "TextPrompt", "TokensPrompt", "PromptType"):
        assert name in loraplex.__all__ and getattr(loraplex, name) is not None, name


def test_typed_prompts_match_plain_ones(tiny_models, tiny_adapters, tokenizer):
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=16)
    ids = tokenizer.encode(TEXT)
    for lora in (None, LoRARequest("a", 1, str(tiny_adapters["llama"]["r8_all"]))):
        plain = llm.generate([TEXT, {"prompt_token_ids": ids}], GREEDY, lora_request=lora,
                             use_tqdm=False)
        typed = llm.generate([TextPrompt(prompt=TEXT), TokensPrompt(prompt_token_ids=ids)],
                             GREEDY, lora_request=lora, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in typed] == \
            [o.outputs[0].token_ids for o in plain]
        # the text prompt is the token prompt (the tokenizer adds no special tokens twice)
        assert typed[0].prompt_token_ids == ids and typed[0].prompt == TEXT


def test_async_engine_streams_adapters_side_by_side(tiny_models, tiny_adapters, tokenizer):
    adapters = tiny_adapters["llama"]
    loras = [None, LoRARequest("r4", 1, str(adapters["r4_qv"])),
             LoRARequest("r8", 2, str(adapters["r8_all"]))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = TokensPrompt(prompt_token_ids=tokenizer.encode(TEXT))
    llm = make_llm(tiny_models["llama"], enable_lora=True, max_loras=1, max_lora_rank=16)
    want = [llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0]
            .outputs[0].token_ids for lora in loras]

    async def main() -> list[list[list[int]]]:
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
            model=str(tiny_models["llama"]), dtype="float32", max_model_len=64,
            cpu_kv_cache_gib=0.02, enable_lora=True, max_loras=1, max_lora_rank=16))

        async def stream(i: int, lora: LoRARequest | None) -> list[list[int]]:
            return [list(out.outputs[0].token_ids)
                    async for out in engine.generate(prompt, params, f"req-{i}", lora)]
        try:
            return await asyncio.gather(*(stream(i, lora) for i, lora in enumerate(loras)))
        finally:
            await engine.shutdown()

    streams = asyncio.run(main())
    for got, expected in zip(streams, want, strict=True):
        assert got[-1] == list(expected)
        assert all(got[k] == got[-1][:len(got[k])] for k in range(len(got)))  # cumulative
    assert want[0] != want[1] and want[1] != want[2]  # the adapters change the outputs

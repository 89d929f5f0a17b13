"""LLM: the offline batch API (vLLM's). Builds an LLMEngine and drives it to completion."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from loraplex.beam_search import BeamSearchOutput, beam_search
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from loraplex.entrypoints.chat_images import ChatImages
from loraplex.inputs import PromptType
from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest
from loraplex.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from loraplex.pooling_params import PoolingParams
from loraplex.sampling_params import BeamSearchParams, SamplingParams
from loraplex.scoring import (
    cosine_scores,
    cross_encoder_ids,
    pair_indices,
    truncation_length,
)

Conversation = list[dict[str, Any]]


class LLM:
    """One base model (plus LoRA adapters when enable_lora=True) for offline generation,
    or, with runner="pooling" (vLLM's task="embed"), for embeddings (`embed`).

    Keyword arguments are EngineArgs fields (vLLM's names); an unknown one is a TypeError.
    """

    def __init__(self, model: str, tokenizer: str | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - EngineArgs.field_names())
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s) {', '.join(unknown)}; "
                            "the options are the fields of loraplex.EngineArgs")
        self.llm_engine = LLMEngine.from_engine_args(
            EngineArgs(model=model, tokenizer=tokenizer, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self, lora_request: LoRARequest | None = None):
        """The base model's tokenizer, or a registered adapter's own when it adds tokens."""
        return self.llm_engine.get_tokenizer(lora_request)

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 use_tqdm: bool = True, priority: Seq[int] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. `priority`: one
        per prompt, lower served earlier (needs scheduling_policy="priority", as in vLLM).

        Raises LoRAError when an adapter fails to load while the batch runs (unreadable or
        missing weights, shapes of another base, a failed hub download), as vLLM raises:
        the call's other requests are aborted, so the next call starts from a clean engine.
        """
        self._require_runner("generate", "LLM.generate()")
        prompts = _as_list(prompts)
        params = _broadcast(sampling_params, len(prompts), "sampling_params",
                            self.get_default_sampling_params())
        loras = _broadcast(lora_request, len(prompts), "lora_request", None)
        priorities = _broadcast(priority, len(prompts), "priority", 0)
        self._register(loras)
        return self._run(prompts, params, loras, use_tqdm, priorities)

    def encode(self, prompts: PromptType | Seq[PromptType],
               pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
               use_tqdm: bool = True,
               lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
               ) -> list[PoolingRequestOutput]:
        """vLLM's: each prompt's pooled final hidden state (`outputs.data`, a tensor), in
        input order; a pooling runner only. `lora_request`: one for all or one per
        prompt; prompts under different adapters share each forward."""
        self._require_runner("pooling", "LLM.encode()")
        prompts = _as_list(prompts)
        params = _broadcast(pooling_params, len(prompts), "pooling_params", PoolingParams())
        loras = _broadcast(lora_request, len(prompts), "lora_request", None)
        self._register(loras)
        return self._run(prompts, params, loras, use_tqdm, [0] * len(prompts))

    def embed(self, prompts: PromptType | Seq[PromptType], *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
              lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
              ) -> list[EmbeddingRequestOutput]:
        """vLLM's: one embedding per prompt (`outputs.embedding`, a list of floats),
        pooled and normalized as the model's PoolerConfig says (a request's
        PoolingParams may change `normalize` and ask for matryoshka `dimensions`).
        `truncate_prompt_tokens`: keep each prompt's last k tokens (-1: max_model_len - 1),
        for every prompt whose PoolingParams does not say."""
        self._require_runner("pooling", "LLM.embed()")
        self._require_task("embed", "LLM.embed()")
        if truncate_prompt_tokens is not None:
            n = len(_as_list(prompts))
            pooling_params = [p if p.truncate_prompt_tokens is not None else replace(
                p, truncate_prompt_tokens=truncate_prompt_tokens) for p in _broadcast(
                    pooling_params, n, "pooling_params", PoolingParams())]
        return [EmbeddingRequestOutput.from_base(out) for out in self.encode(
            prompts, pooling_params, use_tqdm, lora_request)]

    def score(self, data_1: str | Seq[str], data_2: str | Seq[str], *,
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
              ) -> list[ScoringRequestOutput]:
        """vLLM's: each pair's score (pairs: 1:1, 1:N, or N:N in order). An embedding
        model: the cosine similarity of the pair's embeddings, every text embedded in one
        batch under `lora_request`. A cross-encoder (a classifier with one label): each
        pair one input (scoring.cross_encoder_ids), its logit through the score activation;
        `lora_request` may then be one per pair."""
        self._require_runner("pooling", "LLM.score()")
        first = [data_1] if isinstance(data_1, str) else list(data_1)
        second = [data_2] if isinstance(data_2, str) else list(data_2)
        pairs = pair_indices(len(first), len(second))
        if self.llm_engine.classify:
            return self._cross_encoder_score(first, second, pairs, truncate_prompt_tokens,
                                             use_tqdm, lora_request)
        self._require_task("embed", "LLM.score()")
        outs = self.embed(first + second, truncate_prompt_tokens=truncate_prompt_tokens,
                          use_tqdm=use_tqdm, lora_request=lora_request)
        vectors = [torch.tensor(o.outputs.embedding) for o in outs]
        scores = cosine_scores(vectors[:len(first)], vectors[len(first):], pairs)
        ours, theirs = outs[:len(first)], outs[len(first):]
        return [ScoringRequestOutput(f"{ours[i].request_id}_{theirs[j].request_id}",
                                     ScoringOutput(score),
                                     ours[i].prompt_token_ids + theirs[j].prompt_token_ids)
                for (i, j), score in zip(pairs, scores, strict=True)]

    def _cross_encoder_score(self, first: list[str], second: list[str],
                             pairs: list[tuple[int, int]], truncate: int | None,
                             use_tqdm: bool,
                             lora_request: LoRARequest | Seq[LoRARequest | None] | None
                             ) -> list[ScoringRequestOutput]:
        engine = self.llm_engine
        engine.pooling.check_score()
        PoolingParams(truncate_prompt_tokens=truncate)  # checked, as every pooling call's
        max_length = truncation_length(truncate, engine.model_config.max_model_len)
        loras = _broadcast(lora_request, len(pairs), "lora_request", None)
        self._register(loras)  # an adapter that adds tokens encodes with its tokenizer
        prompts: list[PromptType] = [{"prompt_token_ids": cross_encoder_ids(
            engine.get_tokenizer(lora), first[i], second[j], engine.use_pad_token,
            max_length)} for (i, j), lora in zip(pairs, loras, strict=True)]
        params = PoolingParams(task="score")
        outs = self._run(prompts, [params] * len(prompts), loras, use_tqdm,
                         [0] * len(prompts))
        return [ScoringRequestOutput(out.request_id, ScoringOutput(float(out.outputs.data[0])),
                                     out.prompt_token_ids) for out in outs]

    def classify(self, prompts: PromptType | Seq[PromptType], *, use_tqdm: bool = True,
                 pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None
                 ) -> list[ClassificationRequestOutput]:
        """vLLM's, for a `*ForSequenceClassification` checkpoint: each prompt's class
        probabilities (`outputs.probs`) from its last token, under its adapter's own
        classifier head when the adapter has one, else the base's. Prompts under
        different adapters share each forward."""
        self._require_runner("pooling", "LLM.classify()")
        self._require_task("classify", "LLM.classify()")
        return [ClassificationRequestOutput.from_base(out) for out in self.encode(
            prompts, pooling_params, use_tqdm, lora_request)]

    def _require_task(self, task: str, call: str) -> None:
        """vLLM's refusal of embeddings from a classifier and of classify from an
        embedding model."""
        ours = self.llm_engine.model_config.pooling_task
        if ours != task:
            raise ValueError(f"{call} is not supported by this model: it runs the "
                             f"pooling task {ours!r}" + (
                                 " (a *ForSequenceClassification checkpoint is needed)"
                                 if task == "classify" else
                                 " (use LLM.classify(), or task='embed' for its pooled "
                                 "hidden states)"))

    def _require_runner(self, runner: str, call: str) -> None:
        """vLLM's refusal of generation on a pooling model and of pooling on a generative
        one, before any prompt is queued."""
        if self.llm_engine.model_config.runner == runner:
            return
        if runner == "generate":
            raise ValueError(f"{call} is only supported for generative models; this LLM "
                             "was started with runner='pooling': use LLM.embed(), or "
                             "runner='generate'")
        raise ValueError(f"{call} is only supported for pooling models; start the LLM "
                         "with runner='pooling' (vLLM's task='embed')")

    def _register(self, loras: Seq[LoRARequest | None]) -> None:
        """Each adapter once, before its prompts are encoded; a hub id is fetched and read
        now (whether it adds tokens decides how its prompts are encoded)."""
        for lora in {lora.lora_int_id: lora for lora in loras if lora is not None}.values():
            self.llm_engine.register_lora(lora, fetch_hub=True)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prompt prefix (False while requests run)."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams with the model's generation_config.json defaults
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens);
        what `generate` uses when given none."""
        return SamplingParams(**self.llm_engine.generation_defaults.sampling)

    def beam_search(self, prompts: Seq[PromptType], params: BeamSearchParams,
                    lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search: for each prompt the params.beam_width best sequences by
        length-penalized cumulative logprob (loraplex/beam_search.py)."""
        prompts = list(prompts)
        loras = _broadcast(lora_request, len(prompts), "lora_request", None)
        return beam_search(self, prompts, params, loras, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate.
        `chat_template_kwargs` (vLLM's: {"enable_thinking": False} for Qwen3) and any other
        keyword (tools, continue_final_message, ...) go to the template;
        `mm_processor_kwargs` (vLLM's) to each prompt with images."""
        template_kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        loras = _broadcast(lora_request, len(conversations), "lora_request", None)
        self._register(loras)  # an adapter that adds tokens renders with its tokenizer
        prompts: list[PromptType] = []
        engine = self.llm_engine
        for conv, lora in zip(conversations, loras):
            tok = engine.get_tokenizer(lora)
            # image parts (image_url, image_pil), video_url parts (Qwen-VL): they go with
            # the prompt
            images = ChatImages.for_engine(engine, chat_template or tok.chat_template, tok)
            conv = [{**m, "content": images.content(m.get("content"), i)} if "content" in m
                    else m for i, m in enumerate(conv)]
            ids = tok.apply_chat_template(conv, chat_template=chat_template, tokenize=True,
                                          add_generation_prompt=add_generation_prompt,
                                          **template_kwargs)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in v5
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)} | (
                {"multi_modal_data": images.multi_modal_data(),
                 "mm_processor_kwargs": mm_processor_kwargs or {}} if images else {}))
        return self.generate(prompts, sampling_params, loras, use_tqdm)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams | PoolingParams],
             loras: list[LoRARequest | None], use_tqdm: bool, priorities: list[int]
             ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._counter)) for _ in prompts]
        added: list[str] = []
        finished: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, p, lora, prio in zip(ids, prompts, params, loras, priorities,
                                                  strict=True):
                engine.add_request(rid, prompt, p, lora_request=lora, priority=prio)
                added.append(rid)
            with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                      dynamic_ncols=True) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if not out.finished:
                            continue
                        if out.error is not None:  # its adapter failed to load
                            raise LoRAError(out.error)
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request(added)  # a bad input or adapter fails the call, not the engine
            raise
        return [finished[rid] for rid in ids]


def _as_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
    """One prompt (a string, a prompt dict or a list of token ids) or a list of them."""
    if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _broadcast(value: Any, n: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n

"""LLMEngine: requests in, one batched step at a time, RequestOutputs out (vLLM's API).

    add_request -> (_tokenize / _prompt_embeds, the adapter registered, checks)
                -> Sequence(s) into Scheduler's waiting queue
    step        -> Scheduler.schedule -> LoRAManager.activate -> ModelRunner.run
                -> Sampler -> detokenize, check stops -> RequestOutput

A step is one forward over the running sequences' next tokens and the newly admitted
prompts together (Scheduler: a mixed step). This file keeps that loop and the engine's
wiring (__init__); the rest is mixed in from files of one idea each:
engine/model_loading.py (config, tokenizer, weights), engine/prompt_inputs.py (a prompt
into ids or embeddings), engine/pooling_requests.py (a pooling runner's requests),
engine/lora_admin.py (add_lora, remove_lora, ...: adapters against the requests),
engine/multimodal_api.py (the multimodal properties, default_mm_loras); get_stats'
EngineStats is engine/stats.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import replace

import torch

from loraplex import envs
from loraplex.config import EngineConfig, kv_cache_dtype
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.draft_model import make_draft
from loraplex.engine.eagle import EagleProposer, make_eagle
from loraplex.engine.generation_config import GenerationDefaults
from loraplex.engine.images import build_vision
from loraplex.engine.logits_processors import LogitsProcessorBatch, load_logits_processors
from loraplex.engine.lora_admin import LoRAAdmin
from loraplex.engine.model_loading import ModelLoading
from loraplex.engine.multimodal_api import DEFAULT_MM_LORA_IDS, MultimodalAPI
from loraplex.engine.multimodal_prompt import (
    MultimodalPrompts,
    default_mm_lora,
    encoder_config,
    load_processor,
)
from loraplex.engine.pooling_heads import PoolingHeads
from loraplex.engine.pooling_requests import PoolingRequests
from loraplex.engine.prompt_checks import (
    bad_words_token_ids,
    cache_salt,
    check_logprobs,
    check_prompt,
    check_runner,
    check_token_ids,
)
from loraplex.engine.prompt_inputs import PromptInputs
from loraplex.engine.request import Request
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.spec_decode import Drafter, SpecDecodeLogger, SpecDecodeStats, draft_probs
from loraplex.engine.stats import EngineStats, collect_stats
from loraplex.engine.structured_output import StructuredOutputs
from loraplex.inputs import PromptType
from loraplex.layers.sampler import Sampler, SamplerOutput, SamplingRow
from loraplex.lora.manager import LoRAManager
from loraplex.lora.request import LoRARequest
from loraplex.models.registry import is_headless
from loraplex.models.whisper import WhisperConfig, is_whisper
from loraplex.outputs import PoolingRequestOutput, RequestOutput
from loraplex.pooling_params import PoolingParams
from loraplex.reasoning import REASONING_PARSERS, reasoning_ended, reasoning_opened
from loraplex.sampling_params import SamplingParams
from loraplex.worker.cpu_allocator import keep_freed_memory
from loraplex.worker.device import use_device
from loraplex.worker.memory import cpu_cache_config, kv_block_bytes, plan_memory
from loraplex.worker.model_runner import ModelRunner

__all__ = ["DEFAULT_MM_LORA_IDS", "EngineStats", "LLMEngine"]

logger = logging.getLogger(__name__)


class LLMEngine(ModelLoading, PromptInputs, PoolingRequests, LoRAAdmin, MultimodalAPI):
    """vLLM's LLMEngine on one device; single-threaded (AsyncLLMEngine calls it from one
    thread). The mixins are this class's parts by topic (module docstring), not bases to
    use alone: they read the attributes __init__ sets."""

    def __init__(self, args: EngineArgs) -> None:
        path, hf_config, whole = self._resolve_config(args)  # (engine/model_loading.py)
        self.config: EngineConfig = args.create_engine_config(hf_config)
        self.model_config = self.config.model_config
        # custom logits processors: imported now, so a bad name fails before the model loads
        logits_processor_classes = load_logits_processors(
            args.logits_processors, self.config.model_config.runner,
            self.config.speculative_config is not None)
        self.lora_config = self.config.lora_config
        self.multimodal = self.config.multimodal_config
        # the vision tower / audio encoder's config; None: text only (also when
        # limit_mm_per_prompt allows none of its inputs: the encoder never built)
        vision = encoder_config(whole, self.text_only, self.multimodal, args.model)
        mc = self.model_config
        # the pooler config, and a classifier's head, labels, activations (pooling_heads.py)
        self.pooling = PoolingHeads.configure(hf_config, mc, path)
        self.classify = self.pooling.classify
        # a converted causal LM keeps its lm_head (the head's rows come from it)
        self.headless = is_headless(hf_config) and self.pooling.lm_head_classifier is None
        # a cross-encoder's pair: text_pair (true), or the two texts concatenated (vLLM)
        self.use_pad_token = bool(getattr(hf_config, "use_pad_token", True))
        use_device(mc.device)
        torch.manual_seed(mc.seed)
        if mc.device.type == "cpu" and envs.LORAPLEX_CPU_KEEP_FREED_MEMORY:
            keep_freed_memory()
        self.tokenizer = self._first_tokenizer(args, path)
        # the model's processor of multi_modal_data (engine/multimodal_prompt.py)
        processor = load_processor(path, vision, self.tokenizer)
        self.vision = (self._build(lambda: build_vision(vision))
                       if processor is not None else None)
        if is_whisper(hf_config):  # engine/whisper_inputs.py; its encoder is in the model
            self._check_whisper()
            processor = load_processor(path, WhisperConfig.from_hf(hf_config), self.tokenizer)
        self.mm_prompts = MultimodalPrompts(processor, self.multimodal, self.tokenizer)
        self._check_hybrid(hf_config)
        self.model = self._load_model(hf_config, path)
        self.lora_manager = (LoRAManager(self.model, self.lora_config, mc.dtype,
                                         classifier_heads=self.classify,
                                         tower=self._lora_tower())
                             if self.lora_config else None)
        block_size = self.config.cache_config.block_size
        kv_dtype = kv_cache_dtype(self.config.cache_config.cache_dtype, mc.dtype)
        self.memory = plan_memory(self.lora_manager, kv_block_bytes(self.model, kv_dtype,
                                                                    block_size),
                                  block_size, mc.max_model_len, kv_dtype)
        cache_config = cpu_cache_config(self.config.cache_config, self.memory, mc.device.type)
        lm = self.lora_manager
        spec = self.config.speculative_config
        # a draft model (speculative decoding): loaded before the KV cache is sized, so
        # its weights and its cache come out of the same budget (worker/memory.py)
        draft_model = self._load_draft_model(hf_config, kv_dtype, block_size)
        self.model_runner = ModelRunner(self.model, mc, cache_config,
                                        self.config.scheduler_config,
                                        lm.eager_slots if lm else None,
                                        lm.rope_offsets if lm else None, self.vision,
                                        spec.num_speculative_tokens if spec else 0,
                                        self.memory.draft_kv_block_bytes)
        self.memory.num_kv_blocks = self.model_runner.num_blocks
        if self.model_runner.max_num_seqs < self.config.scheduler_config.max_num_seqs:
            # no more running sequences than their encoder K/V (Whisper) or Mamba state
            # (a hybrid) fit beside their KV cache (ModelRunner._reserve_per_sequence)
            self.config.scheduler_config = replace(self.config.scheduler_config,
                                                   max_num_seqs=self.model_runner.max_num_seqs)
        if self.model_runner.num_blocks * block_size < mc.max_model_len:
            slots = (f" after the adapter slots took {self.memory.lora_slot_bytes / 2**20:.1f} "
                     "MiB (lower max_loras or max_lora_rank)" if self.lora_manager else "")
            raise ValueError(
                f"the KV cache holds {self.model_runner.num_blocks * block_size} tokens{slots}, "
                f"fewer than max_model_len={mc.max_model_len}; give it more memory or lower "
                "max_model_len")
        lc = self.lora_config
        logger.info("memory: %s", self.memory.describe(lc.max_lora_rank, lc.max_cpu_loras)
                    if lc else self.memory.describe(0))
        self.block_manager = BlockManager(self.model_runner.num_blocks, block_size,
                                          self.config.cache_config.enable_prefix_caching,
                                          self.model_runner.mamba_state)
        # speculative decoding: drafts per decoding sequence (ngram, or the draft model
        # with its own KV cache of as many blocks), their counters
        make = make_draft if spec and spec.method == "draft_model" else make_eagle
        self.draft = (make(draft_model, mc, self.config.cache_config,
                           self.config.scheduler_config, spec, self.model_runner.num_blocks)
                      if draft_model is not None else None)
        if isinstance(self.draft, EagleProposer):  # the target's features feed the head
            self.model_runner.feature_sink = self.draft.observe
        self.drafter = Drafter(spec, mc.max_model_len, self.draft) if spec else None
        self.spec_stats = SpecDecodeStats() if spec else None
        self.spec_logger = SpecDecodeLogger() if spec else None
        self.scheduler = Scheduler(
            self.config.scheduler_config, self.block_manager,
            lm.num_unpinned_capacity if lm else None,
            **({"lora_ready": lm.is_ready, "lora_pinned": lm.pinned.__contains__} if lm else {}),
            propose=self.drafter.propose_all if self.drafter else None,
            release=self.draft.release if self.draft else self.model_runner.release_state)
        # generation_config.json: the ids that end a turn, the authors' sampling defaults
        self.generation_defaults = GenerationDefaults.read(path, mc.generation_config)
        eos_ids: set[int] = set(self.generation_defaults.eos_token_ids)
        for eos in (self.tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
            eos_ids.update([eos] if isinstance(eos, int) else eos or [])
        self.eos_token_ids = eos_ids
        self.sampler = Sampler(eos_ids)
        self.logits_processors = (LogitsProcessorBatch(logits_processor_classes, self.config,
                                                       mc.device)
                                  if logits_processor_classes else None)
        self.structured = StructuredOutputs(self.tokenizer, self.model.args.vocab_size)
        # a reasoning model: its tag ids, so structured outputs start after the reasoning
        self.reasoning = (REASONING_PARSERS[mc.reasoning_parser] if mc.reasoning_parser
                          else None)
        self.reasoning_tags = self.reasoning.tag_ids(self.tokenizer) if self.reasoning \
            else None
        self.requests: dict[str, Request] = {}
        self._pending_lora_removal: set[int] = set()
        self.default_mm_loras = self._default_mm_loras()
        if self.modalities == ("audio",) and "audio" not in self.default_mm_loras \
                and getattr(whole, "has_lora_adapter", False):
            logger.warning("%s ships a LoRA adapter for its audio inputs (has_lora_adapter): "
                           "without default_mm_loras={'audio': <the model>} (and enable_lora) "
                           "audio requests run on the base model", args.model)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | PoolingParams | None = None,
                    lora_request: LoRARequest | None = None, priority: int = 0) -> None:
        """Queue a request: SamplingParams on a generate runner, PoolingParams on a pooling
        one. Raises ValueError (LoRAError for a bad adapter); nothing is queued then.
        `priority`: lower is served earlier, under the priority scheduling policy only
        (vLLM's)."""
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if priority != 0 and self.config.scheduler_config.policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not "
                             "enabled.")  # vLLM's words
        if params is None:
            params = PoolingParams() if self.model_config.runner == "pooling" \
                else SamplingParams()
        check_runner(self.model_config.runner, params)
        if isinstance(params, PoolingParams):
            self._add_pooling_request(request_id, prompt, params, lora_request, priority)
            return
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self.mm_prompts.request_prompt(prompt)  # (Whisper's forms as one dict)
        lora_request = lora_request or default_mm_lora(prompt, self.default_mm_loras)
        # the adapter first: one that adds tokens brings its own tokenizer
        lora_id = self._use_lora(lora_request) if lora_request is not None else 0
        tokenizer, vocab = self.get_tokenizer(lora_request), self.vocab_size(lora_request)
        embedded = isinstance(prompt, dict) and "prompt_embeds" in prompt
        if embedded:
            text, ids, images = None, *self._prompt_embeds(prompt, params)
        else:
            text, ids = self._tokenize(prompt, tokenizer)
            ids, images = self.mm_prompts.inputs(prompt, ids, self.config.scheduler_config)
        n_ids = len(ids)
        ids = params.truncate_prompt(ids, self.model_config.max_model_len)
        if images is not None and len(ids) != n_ids:
            raise ValueError("truncate_prompt_tokens would cut a prompt with images: leave "
                             "it unset for image requests")
        salt = cache_salt(prompt)
        check_prompt(ids, vocab, self.model_config.max_model_len)
        check_token_ids("logit_bias", params.logit_bias or {}, vocab)
        check_token_ids("allowed_token_ids", params.allowed_token_ids or [], vocab)
        check_logprobs(params, self.model_config.max_logprobs)
        if self.logits_processors is not None:
            self.logits_processors.validate(params)
        bad_words = bad_words_token_ids(params.bad_words, tokenizer)
        grammars = (self.structured.matchers(params.structured_outputs, params.n,
                                             self._reasoning(ids))
                    if params.structured_outputs else [None] * params.n)
        seqs, detoks = [], []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.model_config.device)
                gen.manual_seed(params.seed + i)
            seq = Sequence(request_id, i, ids, params, lora_id, gen, priority)
            seq.grammar = grammars[i]
            seq.images = images
            seq.bad_words_token_ids = bad_words
            # cached K/V are shared only under the very same adapter weights, and salt
            registration = self.lora_manager.registration_of(lora_id) if lora_id else 0
            seq.cache_salt = registration.to_bytes(8, "little") + salt
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(tokenizer, [] if embedded else ids, params))
        self.requests[request_id] = Request(request_id, text, ids, params, lora_request, seqs,
                                            detoks, prompt_embedded=embedded)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(str(rid), None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
        self._collect_lora_removals()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def _reasoning(self, prompt_ids: list[int]) -> tuple[int, int, str] | None:
        """For structured outputs on a reasoning model: (start tag, end tag, the reply's
        first state: "constrained" when the prompt closed the reasoning, "reasoning" when it
        opened it, "undecided" when the reply may or may not open with the start tag
        (qwen3), else "reasoning")."""
        if self.reasoning_tags is None:
            return None
        start, end = self.reasoning_tags
        state = ("constrained" if reasoning_ended(prompt_ids, start, end) else
                 "reasoning" if reasoning_opened(prompt_ids, start, end) else
                 "undecided" if self.reasoning.opens_in_reply else "reasoning")
        return start, end, state

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        use_device(self.model_config.device)  # this thread may not be the constructor's
        touched: dict[str, Request] = {}
        manager = self.lora_manager
        if manager is not None:
            failed = manager.poll_loads()  # adapters read since the last step
            if failed:
                self._fail_lora_requests([], failed, touched)
        batch = self.scheduler.schedule()
        seqs = batch.seqs
        lora_slots = None
        if manager is not None:
            manager.prefetch(s.lora_int_id for s in self.scheduler.waiting if s.lora_int_id)
            if seqs:
                lora_slots, failed = manager.activate(
                    {s.lora_int_id for s in seqs if s.lora_int_id},
                    keep=self.scheduler.running_loras())
                if failed:
                    kept = set(self._fail_lora_requests(seqs, failed, touched))
                    batch = batch.keep(kept)
                    seqs = batch.seqs
            elif not touched and manager.loader.num_inflight:
                manager.loader.wait_any(timeout=0.05)  # only loads left to wait for
        if seqs:
            started = time.monotonic()
            for seq in batch.prefill:  # queue time ends when the forward starts
                req = self.requests[seq.request_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = started
            prompt_positions = batch.prompt_logprob_positions
            logits, prompt_hidden, prompt_slots = self.model_runner.run(
                batch.prefill, batch.decode, lora_slots, batch.prefill_lens, prompt_positions,
                batch.spec, batch.spec_tokens)
            seqs = batch.sampled  # a prompt's earlier chunks give no token
            if prompt_positions:
                self._add_prompt_logprobs(prompt_positions, prompt_hidden, prompt_slots)
            batch.advance()
            for seq in batch.prefill + batch.decode:  # full blocks become shareable
                self.block_manager.commit(seq, state=True)  # prefixes (a hybrid's state
                # at a block boundary a snapshot: a chat's next turn starts after the reply)
            self._finish_pooling(batch.prefill, touched)
            # the logits' rows: finished prompts, each verified sequence's last token and
            # drafts (one row per position, the output before it: penalties etc. per
            # position), then the decodes
            done = seqs[:len(seqs) - len(batch.decode)]
            seq_drafts = ([(s, []) for s in done] + list(zip(batch.spec, batch.spec_tokens))
                          + [(s, []) for s in batch.decode])
            rows, row_seqs, drafts = [], [], []
            for s, d in seq_drafts:
                out = s.output_token_ids
                rows += [SamplingRow(s.params, _scored_prompt(s), out + d[:j] if j else out,
                                     s.generator, s.bad_words_token_ids)
                         for j in range(len(d) + 1)]
                row_seqs += [s] * (len(d) + 1)
                drafts += d + [-1]
            if self.logits_processors is not None:  # (no drafts: one row per sequence)
                self.logits_processors.update(row_seqs)
            mask = (self.structured.token_mask([s.grammar for s in row_seqs])
                    if any(s.grammar is not None for s in row_seqs) else None)
            sampled = (self.sampler(logits, rows, mask, drafts if batch.spec else None,
                                    draft_probs(seq_drafts, batch, logits),
                                    self.logits_processors)
                       if rows else None)
            now = time.monotonic()
            i = 0  # each sequence's first row
            for seq, d in seq_drafts:
                req = self.requests[seq.request_id]
                if req.first_token_time is None:
                    req.first_token_time = now
                if d:
                    self._emit_verified(req, seq, sampled, i, len(d))
                else:
                    self._append_token(req, seq, sampled.token_ids[i],
                                       sampled.token_logprobs[i], sampled.logprobs[i])
                i += len(d) + 1
                if not req.seqs[0].needs_prompt_logprobs:  # (n > 1: a sibling may be ahead)
                    touched[req.request_id] = req
            if self.spec_logger is not None:
                self.spec_logger.maybe_log(self.spec_stats)
        outputs = []
        for rid, req in touched.items():
            outputs.append(req.to_output())
            if req.finished:
                self.requests.pop(rid, None)
        self._collect_lora_removals()
        return outputs

    def _add_prompt_logprobs(self, positions: list[tuple[Sequence, range]],
                             hidden: torch.Tensor, slots: list[int] | None) -> None:
        """Entry p + 1 of each sequence's prompt logprobs from the logits at position p."""
        tokens = [seq.token_ids[p + 1] for seq, span in positions for p in span]
        ks = [seq.params.prompt_logprobs for seq, span in positions for _ in span]
        entries = []
        for logits in self.model_runner.prompt_logits(hidden, slots):
            n = len(entries)
            entries += self.sampler.token_logprobs(logits, tokens[n:n + logits.shape[0]],
                                                   ks[n:n + logits.shape[0]])
        it = iter(entries)
        for seq, span in positions:
            seq.prompt_logprobs.extend(next(it) for _ in span)

    def _emit_verified(self, req: Request, seq: Sequence, out: SamplerOutput, first: int,
                       num_drafts: int) -> None:
        """A verified sequence's tokens: rows first..first + num_drafts of `out` hold the
        token after its last one and after each draft; the accepted drafts and the token
        after them are appended one at a time, exactly as that many decode steps would
        (each advances the cache by the token before it and commits full blocks; a stop,
        eos or max_tokens ends the run there). The K/V of rejected drafts stay behind the
        sequence's length, never read, and their blocks go back (BlockManager.trim)."""
        accepted = 0
        while accepted < num_drafts and out.accepted[first + accepted]:
            accepted += 1
        self.spec_stats.observe(num_drafts, accepted)
        for r in range(first, first + accepted + 1):
            seq.num_computed_tokens += 1  # the token before row r's is in the cache now
            self.block_manager.commit(seq)
            self._append_token(req, seq, out.token_ids[r], out.token_logprobs[r],
                               out.logprobs[r])
            if seq.is_finished:
                return
        self.block_manager.trim(seq)

    def _append_token(self, req: Request, seq: Sequence, token: int, token_logprob: float,
                      logprobs: dict | None) -> None:
        seq.append_token(token)
        if seq.grammar is not None:
            seq.grammar.accept_token(token)  # the mask allowed only tokens it accepts
        seq.cumulative_logprob += token_logprob
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        n_out = seq.num_output_tokens
        detok = req.detokenizers[seq.index]
        can_stop = n_out >= p.min_tokens
        if can_stop and not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif can_stop and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            detok.append(token)
            hit = detok.stop_string_hit() if can_stop else None
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
            elif (p.max_tokens is not None and n_out >= p.max_tokens) or \
                    seq.num_tokens >= self.model_config.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is None and seq.grammar is not None and seq.grammar.is_terminated():
            seq.finish_reason = "stop"  # the grammar is complete (its stop token taken)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    # ---- the prefix cache, counters ----------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False (with a warning) while requests hold KV blocks."""
        if self.block_manager.reset_prefix_cache():
            return True
        logger.warning("the prefix cache was not reset: %d KV blocks are still held by "
                       "requests (reset when none runs)",
                       self.block_manager.num_blocks - self.block_manager.num_free_blocks)
        return False

    def get_stats(self) -> EngineStats:
        return collect_stats(self.scheduler, self.block_manager, self.lora_manager,
                             self.lora_config.max_loras if self.lora_config else 0,
                             self.spec_stats)


def _scored_prompt(seq: Sequence) -> list[int]:
    """The prompt tokens the repetition penalty sees: none for prompt_embeds (their ids
    are placeholders)."""
    return [] if seq.images is not None and seq.images.prompt_embeds else seq.prompt_token_ids


"""Sequences in, next-token logits out: builds the flat batch and the step context.

Owns the model, its KV cache and the decode CUDA graphs; the LoRA slots live in the
model's wrapped layers. Prefill sequences' tokens (this step's chunk of each: from its
num_computed_tokens on, attending to the cached ones before) are laid out back to back;
decoding sequences give one token each, in buffers that a captured graph replays over
(worker/cuda_graph.py; on the torch backend, longest context first). A mixed step puts
both in one forward: the prefill rows first, then one row per decoding sequence. Each
token carries its position, its KV-cache slot and its adapter slot (-1 = base).

On a GPU the KV cache gets what gpu_memory_utilization leaves after the weights, the
adapter slots and the activation peak of a profile run (the largest step the
scheduler may send, then the sampler over max_num_seqs rows with every option on).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from loraplex.config import CacheConfig, ModelConfig, SchedulerConfig, kv_cache_dtype
from loraplex.engine.images import ImageInputs
from loraplex.engine.sequence import Sequence
from loraplex.layers.attention import (
    Attention,
    DecodeMirror,
    attention_backend,
    decode_splits,
    image_blocks,
    image_key_limits,
    is_fp8,
    torch_prefill_layout,
)
from loraplex.layers.mamba2 import MambaBatch
from loraplex.layers.sampler import Sampler, SamplingRow
from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.tower import has_tower_lora, tower_adapter
from loraplex.models.llama import ImageRows, LlamaForCausalLM
from loraplex.models.llava import VisionWeights
from loraplex.models.whisper import CrossBatch, WhisperForConditionalGeneration
from loraplex.sampling_params import SamplingParams
from loraplex.worker.context import DecodeBuffers, StepContext, step_context
from loraplex.worker.cuda_graph import CUDAGraphRunner, capture_decode_graphs
from loraplex.worker.mamba_state import STATE_LAYERS, MambaStateCache, state_bytes_per_slot
from loraplex.worker.memory import kv_block_bytes, kv_cache_layout
from loraplex.worker.mrope import mrope_delta, mrope_step_positions
from loraplex.worker.state_snapshots import StateSnapshots

logger = logging.getLogger(__name__)
GiB = 2**30


@dataclass(frozen=True)
class GPUMemoryProfile:
    total: int
    free: int  # after the profile run, its activations released
    weights: int  # torch memory in use before the KV cache: weights, adapter slots
    activation_peak: int  # the profile run's peak above `weights`
    utilization: float

    @property
    def kv_budget(self) -> int:
        """total x utilization less the weights and the activation peak, and never more
        than is free now less the activation peak (other processes hold the rest)."""
        by_util = int(self.total * self.utilization) - self.weights - self.activation_peak
        return max(0, min(by_util, self.free - self.activation_peak))

    def describe(self) -> str:
        return (f"{self.total / GiB:.2f} GiB x gpu_memory_utilization={self.utilization} - "
                f"weights and adapter slots {self.weights / GiB:.2f} GiB - activation peak "
                f"{self.activation_peak / GiB:.2f} GiB -> KV cache {self.kv_budget / GiB:.2f} "
                f"GiB ({self.free / GiB:.2f} GiB free)")


class StepOutput(NamedTuple):
    # [sampled rows, vocab]: ScheduledBatch.sampled's order (None: none sampled, a pooling
    # batch, whose sequences got their chunks' hidden states in their PoolingState)
    logits: torch.Tensor | None
    # [prompt positions, hidden]: ScheduledBatch.prompt_logprob_positions' order, or None;
    # their logits come in slices from ModelRunner.prompt_logits
    prompt_hidden: torch.Tensor | None = None
    prompt_slots: list[int] | None = None  # each prompt position's adapter slot (-1: none)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig,
                 cache_config: CacheConfig, scheduler_config: SchedulerConfig,
                 eager_slots: set[int] | None = None,
                 rope_offsets: dict[int, int] | None = None,
                 vision: VisionWeights | None = None,
                 num_speculative_tokens: int = 0,
                 draft_block_bytes: int = 0) -> None:
        self.model = model
        # drafts a decoding sequence may verify in one step: the profile run sizes for them
        self.num_speculative_tokens = num_speculative_tokens
        # a draft model's KV bytes per block: its cache has as many blocks as this one,
        # so each block of the budget pays for both
        self.draft_block_bytes = draft_block_bytes
        self.vision = vision  # the tower and projector: image embeddings at prefill
        # Whisper: its rows cross-attend to their request's encoder states (_cross_batch)
        self.whisper = model if isinstance(model, WhisperForConditionalGeneration) else None
        self.tower_lora = has_tower_lora(vision)  # adapter slots there: a call per adapter
        # kept up to date by the LoRA manager: adapter slots whose layers do work no decode
        # graph holds (DoRA's rescaling), so a batch using one decodes eagerly; and the
        # first rotary table row of each long-context LoRA adapter's tokens
        self.eager_slots = eager_slots if eager_slots is not None else set()
        self.rope_offsets = rope_offsets if rope_offsets is not None else {}
        self.device = model_config.device
        self.dtype = model_config.dtype
        self.kv_cache_dtype = kv_cache_dtype(cache_config.cache_dtype, self.dtype)
        self.block_size = cache_config.block_size
        self.max_model_len = model_config.max_model_len
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        # a hybrid's Mamba2 mixers, LFM2's short convolutions or gated DeltaNet layers:
        # their per-sequence states (worker/mamba_state.py)
        self.mixers = [m for m in model.modules() if isinstance(m, STATE_LAYERS)]
        self.mamba_state: MambaStateCache | None = None
        self.attn_backend = attention_backend(self.device)
        # adapter slots per LoRA layer (0: no LoRA layers)
        self.max_loras = next((m.lora_a_stacked.shape[0] for m in model.modules()
                               if isinstance(m, LinearWithLoRA)), 0)
        self.lm_head_lora = model.lm_head if isinstance(model.lm_head, LinearWithLoRA) else None
        # the tokens adapters add: their logits columns are appended in _logits
        self.extra_vocab = getattr(model.model.embed_tokens, "extra_vocab", None)
        self.full_vocab = getattr(model.model.embed_tokens, "full_vocab", None)
        rotary = model.model.rotary  # longrope: a token's row in the table is not its position
        self.rope_row = rotary.rope_row if rotary.long_offset is not None else None
        self.mrope = rotary.mrope_axis is not None  # Qwen2-VL: 3-D positions (worker/mrope.py)
        self._no_cache_writes = torch.empty(0, dtype=torch.long, device=self.device)
        self.memory_profile: GPUMemoryProfile | None = None
        # a hybrid under prefix caching: its state snapshots (set by _num_kv_blocks)
        self.num_state_snapshots = 0
        self.num_blocks = self._num_kv_blocks(cache_config, scheduler_config)
        self._allocate_kv_cache()
        if self.mixers:
            snapshots = (StateSnapshots(self.mixers, self.num_state_snapshots, self.dtype,
                                        self.device)
                         if cache_config.enable_prefix_caching else None)
            self.mamba_state = MambaStateCache(self.mixers, self.max_num_seqs, self.dtype,
                                               self.device, snapshots, self.block_size)
        self.decode_buffers = DecodeBuffers(self.max_num_seqs,
                                            -(-self.max_model_len // self.block_size),
                                            self.device)
        # torch decode keeps the batch's K/V contiguous across steps (in the model's dtype,
        # dequantized from an FP8 cache), within the cache's size
        self.decode_mirror = DecodeMirror(
            self.block_size, kv_block_bytes(self.model, self.dtype, self.block_size)
            // self.block_size, self.num_blocks * self._bytes_per_block())
        # EAGLE-3: the target keeps its aux layers' inputs (set before this runner is made)
        self.keeps_aux_states = getattr(getattr(model, "model", None), "aux_layers",
                                        None) is not None
        # EAGLE speculative decoding (engine/eagle.py): gets, after every forward, each
        # sequence's first position computed and its rows' features (the final hidden
        # states, or with the model's aux_layers set the EAGLE-3 layers' inputs)
        self.feature_sink: Callable[[list[tuple[Sequence, int, torch.Tensor]]], None] | None \
            = None
        self.num_eager_decode_steps = 0  # pure decode steps run without a graph
        self.num_mixed_steps = 0  # prefill + decode in one forward (always eager)
        self.cuda_graphs: CUDAGraphRunner | None = None
        if self.num_blocks * self.block_size >= self.max_model_len:  # else the engine refuses
            self.cuda_graphs = capture_decode_graphs(
                model, self.decode_buffers, self.max_num_seqs, self.max_model_len,
                self.max_loras,
                model_config.enforce_eager or model_config.runner == "pooling"  # no decode
                or self.whisper is not None  # its cross-attention is per request, eager
                or bool(self.mixers),  # a hybrid's state slots: eager decode
                model_config.cuda_graph_sizes,
                self.attn_backend, host_routed=model.args.host_routed)

    def _bytes_per_block(self) -> int:
        return kv_block_bytes(self.model, self.kv_cache_dtype, self.block_size)

    def _num_kv_blocks(self, cfg: CacheConfig, sched: SchedulerConfig) -> int:
        if cfg.num_blocks_override is not None:
            if self.mixers and cfg.enable_prefix_caching:
                self.num_state_snapshots = (self.max_num_seqs if cfg.mamba_state_snapshots
                                            is None else cfg.mamba_state_snapshots)
            return cfg.num_blocks_override
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            # the largest step: a full prompt budget plus a decode token per sequence (and
            # its drafts, with speculative decoding)
            budget = self._profile_gpu_memory(
                cfg.gpu_memory_utilization, sched.max_num_batched_tokens
                + sched.max_num_seqs * (1 + self.num_speculative_tokens))
        else:
            budget = int(cfg.cpu_kv_cache_gib * GiB)
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        if self.whisper is not None:  # each running request's encoder K/V
            budget = self._reserve_per_sequence(
                budget, blocks_per_seq, self.whisper.config.cross_kv_bytes(self.dtype),
                "Whisper's encoder K/V")
        if self.mixers:  # each running sequence's Mamba state slot
            budget = self._reserve_per_sequence(
                budget, blocks_per_seq,
                state_bytes_per_slot(self.mixers, self.dtype),
                "a Mamba state slot")
            if cfg.enable_prefix_caching:
                budget = self._reserve_snapshots(budget, blocks_per_seq,
                                                 cfg.mamba_state_snapshots)
        # never more than every sequence at full length could use
        most = self.max_num_seqs * blocks_per_seq
        if not self._bytes_per_block() + self.draft_block_bytes:  # no attention layers
            return most  # (Mamba2): blocks hold nothing, they only count positions
        return max(0, min(budget // (self._bytes_per_block() + self.draft_block_bytes), most))

    def _reserve_per_sequence(self, budget: int, blocks_per_seq: int, each: int,
                              what: str) -> int:
        """Memory each running sequence holds beside its KV blocks (Whisper's encoder
        K/V, a hybrid's Mamba state), for max_num_seqs sequences, out of the budget
        first. When that would leave less KV cache than one max_model_len sequence
        needs, max_num_seqs is lowered to what leaves it (logged); refused when not even
        one sequence fits. The budget left for the KV blocks."""
        kv = blocks_per_seq * self._bytes_per_block()
        fit = max(budget - kv, 0) // each
        if fit < 1:
            raise ValueError(f"the KV cache budget ({budget / 2**20:.1f} MiB) cannot hold one "
                             f"sequence: {what} takes {each / 2**20:.2f} MiB and a "
                             f"max_model_len KV cache {kv / 2**20:.2f} MiB; give it more "
                             "memory or lower max_model_len")
        if fit < self.max_num_seqs:
            logger.info("max_num_seqs %d -> %d: the sequences whose %s (%.2f MiB each) fit "
                        "the budget beside one max_model_len KV cache", self.max_num_seqs, fit,
                        what, each / 2**20)
            self.max_num_seqs = fit
        logger.info("%s: %.1f MiB for %d sequences, from the KV cache budget", what,
                    self.max_num_seqs * each / 2**20, self.max_num_seqs)
        return budget - self.max_num_seqs * each

    def _reserve_snapshots(self, budget: int, blocks_per_seq: int, asked: int | None) -> int:
        """Prefix caching on a hybrid: its state snapshots out of the budget, after the
        state slots: `asked` of them (refused when they do not fit beside one max_model_len
        KV cache), or by default max_num_seqs, as many of those as fit in a quarter of the
        budget (a big model's snapshot is tens of MB: the KV cache keeps the rest). The
        budget left."""
        each = state_bytes_per_slot(self.mixers, self.dtype)
        fit = max(budget - blocks_per_seq * self._bytes_per_block(), 0) // each
        if asked is None:
            fit = min(fit, budget // 4 // each)
        if asked is not None and asked > fit:
            raise ValueError(f"mamba_state_snapshots={asked} ({asked * each / 2**20:.1f} MiB) "
                             f"do not fit the KV cache budget beside the state slots and one "
                             f"max_model_len KV cache (room for {fit}); give it more memory "
                             "or ask for fewer")
        self.num_state_snapshots = asked if asked is not None else min(self.max_num_seqs, fit)
        logger.info("prefix caching: %d Mamba state snapshots, %.1f MiB from the KV cache "
                    "budget", self.num_state_snapshots,
                    self.num_state_snapshots * each / 2**20)
        return budget - self.num_state_snapshots * each

    @property
    def release_state(self) -> Callable[[Sequence], None] | None:
        """A hybrid: gives a sequence's state slot back (Scheduler.release); else None."""
        return self.mamba_state.release if self.mamba_state is not None else None

    def _profile_gpu_memory(self, utilization: float, max_tokens: int) -> int:
        """The KV cache budget in bytes, from a profile run's activation peak."""
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        weights = torch.cuda.memory_allocated(dev)
        try:
            self._profile_run(max_tokens)
            torch.cuda.synchronize(dev)
        except torch.OutOfMemoryError as e:
            raise ValueError(
                f"a step of {max_tokens} tokens (max_num_batched_tokens + max_num_seqs x (1 + "
                f"num_speculative_tokens)) does not fit in GPU memory beside the weights and "
                f"adapter slots ({weights / GiB:.2f} GiB): lower max_num_batched_tokens, max_num_seqs, "
                "max_loras or max_lora_rank") from e
        peak = torch.cuda.max_memory_allocated(dev) - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        prof = self.memory_profile = GPUMemoryProfile(total, free, weights, peak, utilization)
        logger.info("GPU memory: %s", prof.describe())
        if prof.kv_budget < int(total * utilization) - weights - peak:
            logger.warning("only %.2f GiB of GPU memory is free (other processes?): the KV "
                           "cache gets less than gpu_memory_utilization allows", free / GiB)
        if prof.kv_budget <= 0:
            raise ValueError(f"no GPU memory is left for the KV cache: {prof.describe()}; "
                             "raise gpu_memory_utilization or lower max_num_batched_tokens")
        return prof.kv_budget

    @torch.inference_mode()
    def _profile_run(self, max_tokens: int) -> None:
        """The largest prefill the scheduler may send (spread over max_num_seqs sequences,
        every adapter slot in use), then the sampler over those rows with every option on.
        The KV cache does not exist yet: attention skips writing it."""
        n = min(max_tokens, self.max_num_seqs * self.max_model_len)
        seqs = max(min(self.max_num_seqs, n), -(-n // self.max_model_len))
        lens = [n // seqs + (i < n % seqs) for i in range(seqs)]
        dev = self.device
        positions = torch.cat([torch.arange(m, device=dev) for m in lens])
        ctx = self._prefill_context(lens, torch.full((n,), -1, dtype=torch.long, device=dev))
        if self.mixers:  # no state slots yet: each sequence from zeros, nothing kept
            ctx.mamba = MambaBatch([(s, s + m, -1, True) for s, m in zip(
                itertools.accumulate(lens[:-1], initial=0), lens)])
        if self.max_loras:
            ctx.lora_meta = LoRABatchMeta.make(
                [i % self.max_loras for i, m in enumerate(lens) for _ in range(m)], dev)
            ctx.lora_meta.skip_unused_layers = False  # no slot has weights yet
        with step_context(ctx):
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=dev), positions)
        # logits rows: each sequence's last, and with speculative decoding its drafts'
        per_seq = 1 + self.num_speculative_tokens
        last = (torch.tensor(lens, device=dev).cumsum(0) - 1).repeat_interleave(per_seq)
        logits = self._logits(hidden.index_select(0, last),
                              [i // per_seq % self.max_loras for i in range(last.shape[0])]
                              if self.max_loras else None, every_slot=True)
        del hidden
        params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.01,
                                repetition_penalty=1.1, presence_penalty=0.1,
                                frequency_penalty=0.1, logprobs=20)
        rows = [SamplingRow(params, [0] * m, [1], None) for m in lens for _ in range(per_seq)]
        # a draft model's sampled drafts come with its distributions: [rows, vocab] more
        draft_probs = (torch.full(logits.shape, 1 / logits.shape[1], dtype=torch.float32,
                                  device=dev)
                       if per_seq > 1 and self.draft_block_bytes else None)
        Sampler(set())(logits, rows, draft_tokens=[0] * len(rows) if per_seq > 1 else None,
                       draft_probs=draft_probs)

    def _allocate_kv_cache(self) -> None:
        # zeros, not empty: masked-out slots still enter `weights @ V`, and 0 * NaN garbage
        # would poison the output; stale values from freed blocks are finite and harmless.
        # Each layer its own heads and head dim (Gemma 4's differ by layer; MLA's latent:
        # one head of latent_dim); a layer that reuses another's K/V gets that one's cache
        for layer in self.attention_layers:
            source = layer.reads_kv_of
            if source is not None:
                layer.k_cache, layer.v_cache = source.k_cache, source.v_cache
                layer.k_scale, layer.v_scale = source.k_scale, source.v_scale
                layer._mirror = source._mirror
                continue
            shape = (self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            layer.v_cache = layer.k_cache if layer.values_are_keys else torch.zeros(
                shape, dtype=self.kv_cache_dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", self.num_blocks,
                    self.block_size, self.num_blocks * self._bytes_per_block() / 2**20,
                    str(self.kv_cache_dtype).removeprefix("torch."))
        if is_fp8(self.kv_cache_dtype):
            scaled = sum(layer.k_scale != 1.0 or layer.v_scale != 1.0
                         for layer in self.attention_layers)
            logger.info("FP8 KV cache: the checkpoint's k_scale / v_scale in %d of %d layers, "
                        "1.0 elsewhere (values beyond +-%g x scale saturate)", scaled,
                        len(self.attention_layers), torch.finfo(self.kv_cache_dtype).max)

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the device
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device,
                                                                         non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prefill_context(self, lens: list[int], slot_mapping: torch.Tensor,
                         cached: list[Sequence] | None = None,
                         starts: list[int] | None = None) -> StepContext:
        """The prefill rows' context: `lens[b]` tokens of sequence b, from position
        `starts[b]` on. A later chunk of a prompt (any start > 0) also attends to the
        earlier ones, read from the cache through `cached`'s block tables."""
        ctx = StepContext(is_prefill=True, slot_mapping=slot_mapping,
                          attn_backend=self.attn_backend, max_seqlen_q=max(lens))
        width = 0
        if cached is not None and starts is not None and any(starts):
            bs = self.block_size
            width = -(-max(st + n for st, n in zip(starts, lens)) // bs)
            ctx.block_tables = self._tensor([(s.block_table + [0] * width)[:width]
                                             for s in cached], torch.int32)
            ctx.context_lens = self._tensor(starts, torch.int32)
            ctx.max_context_len = max(starts)
        if self.attn_backend == "triton":
            ctx.cu_seqlens_q = self._tensor(list(itertools.accumulate(lens, initial=0)),
                                            torch.int32)
        else:
            torch_prefill_layout(ctx, lens, self.device,
                                 starts if width else None, width * self.block_size)
        blocks = [s.images.blocks() if s.images is not None else [] for s in cached or []]
        if any(blocks):  # Gemma 3: each image's tokens see each other
            if self.attn_backend == "triton":
                ctx.key_limit = self._tensor(image_key_limits(blocks, starts or [0] * len(lens),
                                                              lens), torch.int32)
            else:
                image_blocks(ctx, blocks)
        return ctx

    def prepare_prefill(self, seqs: list[Sequence], lens: list[int] | None = None,
                        drafts: list[list[int] | None] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, StepContext, list[int]]:
        """The step's rows for `lens[i]` tokens of each sequence from its
        num_computed_tokens on (default: all the rest), and the rows whose logits are
        wanted: the last of each sequence whose chunk reaches its last token.
        `drafts[i]` (speculative decoding): tokens after sequence i's own, verified in
        this step: its segment is its last token and them, and every row is wanted."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens = lens or [s.num_uncomputed_tokens for s in seqs]
        starts = [s.num_computed_tokens for s in seqs]
        drafts = drafts or [None] * len(seqs)
        rows: list[int] = []
        for seq, start, n, draft in zip(seqs, starts, lens, drafts):
            first = len(input_ids)
            input_ids.extend((seq.token_ids[start:] + draft)[:n] if draft else
                             seq.token_ids[start:start + n])
            positions.extend(range(start, start + n) if self._rows_are_positions() else
                             (self._rope_row(seq, p) for p in range(start, start + n)))
            slots.extend(self._slot_mapping(seq, start, start + n))
            if draft:
                rows.extend(range(first, first + n))
            elif start + n == seq.num_tokens and seq.pooling is None:  # pooling: no logits
                rows.append(len(input_ids) - 1)
        ctx = self._prefill_context(lens, self._tensor(slots), seqs, starts)
        if self.mrope and any(s.images is not None and s.images.mrope is not None for s in seqs):
            return (self._tensor(input_ids), mrope_step_positions(seqs, starts, lens, positions
                                                                 ).to(self.device), ctx, rows)
        return self._tensor(input_ids), self._tensor(positions), ctx, rows

    def _rows_are_positions(self) -> bool:
        """Every token's rotary table row is its position (no LongRoPE, and no
        long-context LoRA adapter loaded)."""
        return self.rope_row is None and not self.rope_offsets

    def _rope_row(self, seq: Sequence, position: int) -> int:
        """The rotary table row of `seq`'s token at `position`. LongRoPE: the long
        frequencies once the sequence (its prompt, or up to this token) is longer than
        the pretraining window, as HF's generate switches (prefill and decode alike).
        Long-context LoRA: the row in the block of its adapter's factor."""
        if self.rope_row is not None:
            return self.rope_row(position, max(seq.num_prompt_tokens, position + 1))
        return position + self.rope_offsets.get(seq.lora_int_id, 0)

    def prepare_decode(self, seqs: list[Sequence], padded_batch: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, StepContext]:
        """The step's inputs in the decode buffers (padded_batch rows: a graph's size)."""
        bs = self.block_size
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        if self.mrope:  # Qwen2-VL: after a prompt with images, text rotates at p + delta
            positions = [p + mrope_delta(s) for s, p in zip(seqs, positions)]
        if not self._rows_are_positions():
            positions = [self._rope_row(s, p) for s, p in zip(seqs, positions)]
        lens = [s.num_tokens for s in seqs]
        buffers = self.decode_buffers
        input_ids, positions_t = buffers.fill_tokens([s.last_token for s in seqs], positions,
                                                     padded_batch)
        slot_mapping, context_lens, block_tables = buffers.fill(
            slots, lens, [s.block_table for s in seqs], padded_batch)
        ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping,
                          attn_backend=self.attn_backend, block_tables=block_tables,
                          context_lens=context_lens, max_context_len=max(lens))
        if padded_batch is None:  # eager (a graph captured its own context)
            if self.attn_backend == "triton":
                ctx.decode_splits = decode_splits(len(seqs), kv_cache_layout(self.model.args)[1],
                                                  ctx.max_context_len, self.device)
            else:
                self.decode_mirror.plan(ctx, [s.seq_id for s in seqs], lens)
        return input_ids, positions_t, ctx

    def _longest_first(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int] | None]:
        """The torch decode path attends per group of rows of similar context length
        (decode_groups): order the rows longest first, stably, so the order holds from
        step to step (every sequence grows by one) and the mirrors keep appending. Also
        returns where each sequence went (None: nothing moved)."""
        if self.attn_backend != "torch" or len(seqs) < 2:
            return seqs, None
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].num_tokens)
        if order == list(range(len(seqs))):
            return seqs, None
        where = [0] * len(seqs)
        for pos, i in enumerate(order):
            where[i] = pos
        return [seqs[i] for i in order], where

    @torch.inference_mode()
    def run(self, prefill: list[Sequence], decode: list[Sequence],
            lora_slots: dict[int, int] | None = None,
            prefill_lens: list[int] | None = None,
            prompt_positions: list[tuple[Sequence, range]] | None = None,
            spec: list[Sequence] | None = None,
            spec_tokens: list[list[int]] | None = None) -> StepOutput:
        """Computes `prefill_lens[i]` tokens of prefill sequence i (default: all it has
        left) and one token of every decoding sequence. Logits of the next token of every
        prefill sequence whose chunk is its last, then of every decoding one
        (ScheduledBatch.sampled); for prompt logprobs, the hidden states at the given
        positions of prefill sequences' chunks.
        Speculative decoding: each `spec` sequence computes its last token and its
        `spec_tokens` as one more segment after the prompts' (a chunk attending to its
        cached tokens, as a prompt's later chunk does), with its own adapter, and gets
        logits at every one of them: 1 + len(drafts) rows between the prefills' and the
        decodes'. Such a step runs eagerly; decode-only steps keep their CUDA graphs."""
        spec, spec_tokens = spec or [], spec_tokens or []
        def slots_of(seqs: list[Sequence]) -> list[int] | None:
            return ([lora_slots[s.lora_int_id] if s.lora_int_id else -1 for s in seqs]
                    if lora_slots else None)

        decode, where = self._longest_first(decode)
        if not prefill and not spec:
            seq_slots = slots_of(decode)
            hidden = self._run_decode(decode, seq_slots)
            if self.feature_sink is not None:
                self._keep_features([], [], decode, hidden)
            logits = self._logits(hidden, seq_slots)
            return StepOutput(logits if where is None else
                              logits.index_select(0, self._tensor(where)))
        lens = prefill_lens or [s.num_uncomputed_tokens for s in prefill]
        segments = prefill + spec
        input_ids, positions, ctx, rows = self.prepare_prefill(
            segments, lens + [len(d) + 1 for d in spec_tokens],
            [None] * len(prefill) + spec_tokens)
        lens = lens + [len(d) + 1 for d in spec_tokens]
        token_slots = ([slot for n, slot in zip(lens, slots_of(segments)) for _ in range(n)]
                       if lora_slots else None)
        if decode:  # mixed: the decoding sequences' rows follow the prompts
            self.num_mixed_steps += 1
            d_ids, d_positions, ctx.decode = self.prepare_decode(decode)
            n = input_ids.shape[0]
            if positions.dim() == 2:  # M-RoPE prefill rows: decode rows' text positions
                d_positions = d_positions.expand(3, -1)
            input_ids, positions = torch.cat([input_ids, d_ids]), torch.cat([positions, d_positions],
                                                                           dim=-1)
            ctx.slot_mapping = torch.cat([ctx.slot_mapping, ctx.decode.slot_mapping])
            rows += [n + w for w in where] if where else range(n, n + len(decode))
            if token_slots is not None:
                token_slots += slots_of(decode)
        else:
            self.decode_mirror.reset()  # the next decode batch is a new one
        if token_slots is not None:
            ctx.lora_meta = LoRABatchMeta.make(token_slots, self.device)
        if self.mamba_state is not None:  # (no speculative decoding: no spec segments)
            ctx.mamba = self.mamba_state.batch(prefill, lens[:len(prefill)], decode,
                                               sum(lens))
        if self.whisper is not None:  # (no speculative decoding: no spec segments)
            ctx.cross = self._cross_batch(prefill + decode, lens[:len(prefill)] + [1] * len(decode),
                                          slots_of(prefill + decode))
        image_rows = self._image_rows(prefill, lens[:len(prefill)], slots_of(prefill))
        with step_context(ctx):
            hidden = self.model(input_ids, positions, image_rows)
        if self.feature_sink is not None:
            self._keep_features(segments, lens, decode, hidden)
        self._pool(prefill, lens, hidden)
        logits = self._logits(hidden.index_select(0, self._tensor(rows)),
                              [token_slots[r] for r in rows] if token_slots else None
                              ) if rows else None  # a pooling batch samples nothing
        if not prompt_positions:
            return StepOutput(logits)
        # row of position p = the chunk's first row + p - its start
        first_row = dict(zip(prefill, itertools.accumulate(lens[:-1], initial=0)))
        prompt_rows = [first_row[seq] + p - seq.num_computed_tokens
                       for seq, span in prompt_positions for p in span]
        return StepOutput(logits, hidden.index_select(0, self._tensor(prompt_rows)),
                          [token_slots[r] for r in prompt_rows] if token_slots else None)

    def _keep_features(self, segments: list[Sequence], lens: list[int],
                       decode: list[Sequence], hidden: torch.Tensor) -> None:
        """The step's rows' features to the EAGLE proposer, per sequence from its first
        position computed: the segments' rows first (prompt chunks, verified drafts),
        then one per decoding sequence (in the step's order)."""
        aux = self.model.model.aux_hidden_states if self.keeps_aux_states else None
        features = hidden if aux is None else aux
        out, first = [], 0
        for seq, n in zip(segments, lens):
            out.append((seq, seq.num_computed_tokens, features[first:first + n]))
            first += n
        for seq in decode:
            out.append((seq, seq.num_tokens - 1, features[first:first + 1]))
            first += 1
        self.feature_sink(out)

    @staticmethod
    def _pool(prefill: list[Sequence], lens: list[int], hidden: torch.Tensor) -> None:
        """Each pooling sequence's chunk rows (final hidden states, after the final norm)
        into its PoolingState; the prefill rows come first in the step, chunk after
        chunk."""
        first = 0
        for seq, n in zip(prefill, lens):
            if seq.pooling is not None:
                seq.pooling.add(hidden[first:first + n], seq.num_computed_tokens)
            first += n

    def _image_rows(self, prefill: list[Sequence], lens: list[int],
                    slots: list[int] | None) -> ImageRows | None:
        """The prefill rows of image placeholders and their image embeddings (the prefill
        rows come first in the step, chunk after chunk). The vision tower runs here, for
        the requests whose chunk reaches a placeholder first (`slots`: each one's adapter
        slot, None: no adapters); later chunks, siblings and a recompute after preemption
        reuse its output (a request's own: ImageInputs are per request)."""
        spans = []  # (the images, their placeholders' rows in the step, their embeds' slice)
        todo: list[tuple[ImageInputs, int]] = []  # (images to encode, their adapter slot)
        first = 0
        for i, (seq, n) in enumerate(zip(prefill, lens)):
            images, start = seq.images, seq.num_computed_tokens
            if images is not None:
                positions, part = images.rows_in(start, start + n)
                if positions:
                    spans.append((images, [first + p - start for p in positions], part))
                    if images.embeds is None:
                        todo.append((images, slots[i] if slots else -1))
            first += n
        if not spans:
            return None
        self._encode_images(todo)
        rows = [r for _, span_rows, _ in spans for r in span_rows]
        return self._tensor(rows), _stack_rows([images.embeds[part] for images, _, part in spans])

    def _cross_batch(self, seqs: list[Sequence], lens: list[int], slots: list[int] | None
                     ) -> CrossBatch:
        """Whisper: each sequence's rows in the step (`lens[i]` of them, in order) and its
        request's cross-attention K/V, from the encoder run here at the request's first
        step, under its adapter (siblings and later steps reuse them)."""
        spans, states, first = [], [], 0
        for i, (seq, n) in enumerate(zip(seqs, lens, strict=True)):
            audio = seq.images  # engine/whisper_inputs.py's WhisperAudio
            if audio.cross_kv is None:
                audio.cross_kv = self.whisper.encode(audio.pixel_values,
                                                     slots[i] if slots else -1)
            spans.append((first, first + n))
            states.append(audio.cross_kv)
            first += n
        return CrossBatch(spans, states)

    def _encode_images(self, todo: list[tuple[ImageInputs, int]]) -> None:
        """One vision tower call on the pixels of every request in `todo` stacked (not one
        per request), its output split back onto each one's ImageInputs. With LoRA on the
        tower, one such call per adapter slot, under that slot (lora/tower.py)."""
        groups: dict[int, dict[int, ImageInputs]] = {}  # siblings share one ImageInputs
        for images, slot in todo:
            groups.setdefault(slot if self.tower_lora else -1, {})[id(images)] = images
        for slot, group in groups.items():
            with tower_adapter(slot, self.device) if self.tower_lora else nullcontext():
                self._encode_group(list(group.values()))

    def _encode_group(self, todo: list[ImageInputs]) -> None:
        """One tower call: `todo`'s pixels stacked, the output split back per request."""
        pixels = torch.cat([images.pixel_values for images in todo]).to(self.device)
        sizes = [s for images in todo for s in images.sizes]
        out = self.vision(pixels, sizes).split([len(images.positions) for images in todo])
        for images, embeds in zip(todo, out):
            images.embeds = embeds

    @torch.inference_mode()
    def prompt_logits(self, hidden: torch.Tensor, slots: list[int] | None = None
                      ) -> Iterator[torch.Tensor]:
        """Logits of prompt positions, max_num_seqs rows at a time: the most the profile
        run sized for (a whole chunk's [tokens, vocab] at once could be gigabytes).
        `slots`: each row's adapter slot (StepOutput.prompt_slots), for LoRA on lm_head."""
        for start in range(0, hidden.shape[0], self.max_num_seqs):
            end = start + self.max_num_seqs
            yield self._logits(hidden[start:end], slots[start:end] if slots else None)

    def _logits(self, hidden: torch.Tensor, row_slots: list[int] | None,
                every_slot: bool = False) -> torch.Tensor:
        """lm_head over the rows to sample, each with its own adapter's LoRA on lm_head
        where that adapter has one (a LoRA metadata of these rows, built only then), and
        the columns of the tokens adapters add when a row's adapter adds some: then the
        logits are [rows, vocab + lora_extra_vocab_size].
        `every_slot`: run the LoRA op even over empty slots (the profile run)."""
        lm_head, meta = self.lm_head_lora, None
        if lm_head is not None and row_slots is not None and (every_slot or any(
                lm_head.slot_ranks[s] for s in set(row_slots) if s >= 0)):
            meta = LoRABatchMeta.make(row_slots, self.device)
            meta.skip_unused_layers = not every_slot
        with step_context(StepContext(is_prefill=False, slot_mapping=self._no_cache_writes,
                                      lora_meta=meta)):
            logits = self.model.compute_logits(hidden)
        full = self.full_vocab
        if full is not None and row_slots is not None and (every_slot or full.any_active(
                "lm_head", row_slots)):  # rows whose adapter trained all of lm_head
            logits = full.replace_logits(hidden, row_slots, logits, self.model.final_logits)
        extra = self.extra_vocab
        if extra is not None and row_slots is not None and (every_slot or
                                                            extra.any_active(row_slots)):
            logits = extra.append_logits(hidden, row_slots, logits, self.model.final_logits)
        return logits

    def _run_decode(self, seqs: list[Sequence], seq_slots: list[int] | None) -> torch.Tensor:
        """Hidden states of one decode step (a graph replay where one fits)."""
        n = len(seqs)
        graphs = self.cuda_graphs
        padded = graphs.padded_size(n) if graphs is not None else None
        if padded is not None and seq_slots and self.eager_slots.intersection(seq_slots):
            padded = None
        if self.keeps_aux_states:  # EAGLE-3's layer inputs: no graph keeps them (the
            padded = None  # graphs return the final hidden states only)
        input_ids, positions, ctx = self.prepare_decode(seqs, padded)
        if self.whisper is not None:
            ctx.cross = self._cross_batch(seqs, [1] * n, seq_slots)
        if self.mamba_state is not None:
            ctx.mamba = self.mamba_state.batch([], [], seqs, 0)
        has_lora = seq_slots is not None and any(s >= 0 for s in seq_slots)
        if padded is not None:
            token_slots = seq_slots + [-1] * (padded - n) if has_lora else None
            hidden = graphs.replay(padded, token_slots)[:n]
        else:
            self.num_eager_decode_steps += 1
            if has_lora:
                ctx.lora_meta = LoRABatchMeta.make(seq_slots, self.device)
            with step_context(ctx):
                hidden = self.model(input_ids, positions)
        return hidden


def _stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The step's image rows' embeddings, one tensor: [N, D], or [N, 1 + L, D] when a
    Qwen3-VL image brings DeepStack features (models/qwen3_vl.py); then rows without
    them (prompt_embeds) get zeros there, which add nothing."""
    depth = max(p.shape[1] if p.dim() == 3 else 1 for p in parts)
    if depth == 1:
        return torch.cat([p if p.dim() == 2 else p[:, 0] for p in parts])
    return torch.cat([p if p.dim() == 3 else torch.cat(
        [p[:, None], p.new_zeros(p.shape[0], depth - 1, p.shape[1])], dim=1) for p in parts])

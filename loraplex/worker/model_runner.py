"""Sequences in, next-token logits out: builds the flat batch and the step context.

Owns the model, its KV cache and the LoRA slots. For a prefill step the tokens of all
sequences are laid out back to back; for a decode step one token per sequence. Each
token carries its position, its KV-cache slot and its adapter slot (-1 = base).
"""

from __future__ import annotations

import logging

import torch

from loraplex.config import CacheConfig, ModelConfig
from loraplex.engine.sequence import Sequence
from loraplex.layers.attention import (
    Attention,
    DecodeMirror,
    attention_backend,
    decode_splits,
    torch_prefill_layout,
)
from loraplex.lora.meta import LoRABatchMeta
from loraplex.models.llama import LlamaForCausalLM
from loraplex.worker.context import DecodeBuffers, StepContext, step_context

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, model_config: ModelConfig,
                 cache_config: CacheConfig, max_num_seqs: int) -> None:
        self.model = model
        self.device = model_config.device
        self.dtype = model_config.dtype
        self.block_size = cache_config.block_size
        self.max_model_len = model_config.max_model_len
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.attn_backend = attention_backend(self.device)
        self.num_blocks = self._num_kv_blocks(cache_config, model_config.max_model_len,
                                              max_num_seqs)
        self._allocate_kv_cache()
        self.decode_buffers = DecodeBuffers(max_num_seqs, -(-self.max_model_len // self.block_size),
                                            self.device)
        # torch decode keeps the batch's K/V contiguous across steps, within the cache's size
        self.decode_mirror = DecodeMirror(self.block_size, self._bytes_per_block() // self.block_size,
                                          self.num_blocks * self._bytes_per_block())

    def _bytes_per_block(self) -> int:
        a = self.model.args
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * elem

    def _num_kv_blocks(self, cfg: CacheConfig, max_model_len: int, max_num_seqs: int) -> int:
        if cfg.num_blocks_override is not None:
            return cfg.num_blocks_override
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - cfg.gpu_memory_utilization))
        else:
            budget = int(cfg.cpu_kv_cache_gib * 2**30)
        blocks_per_seq = -(-max_model_len // self.block_size)
        # never more than every sequence at full length could use
        return max(0, min(budget // self._bytes_per_block(), max_num_seqs * blocks_per_seq))

    def _allocate_kv_cache(self) -> None:
        a = self.model.args
        shape = (self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        # zeros, not empty: masked-out slots still enter `weights @ V`, and 0 * NaN garbage
        # would poison the output; stale values from freed blocks are finite and harmless
        for layer in self.attention_layers:
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", self.num_blocks,
                    self.block_size, self.num_blocks * self._bytes_per_block() / 2**20)

    def _tensor(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the device
            return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device,
                                                                         non_blocking=True)
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor,
                                                              StepContext, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens = [s.num_tokens for s in seqs]
        for seq in seqs:
            input_ids.extend(seq.token_ids)
            positions.extend(range(seq.num_tokens))
            slots.extend(self._slot_mapping(seq, 0, seq.num_tokens))
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        ctx = StepContext(is_prefill=True, slot_mapping=self._tensor(slots),
                          attn_backend=self.attn_backend, max_seqlen_q=max(lens))
        self.decode_mirror.reset()
        if self.attn_backend == "triton":
            ctx.cu_seqlens_q = self._tensor(starts, torch.int32)
        else:
            torch_prefill_layout(ctx, lens, self.device)
        last_rows = [st + n - 1 for st, n in zip(starts, lens)]
        return self._tensor(input_ids), self._tensor(positions), ctx, last_rows

    def prepare_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor,
                                                             StepContext]:
        bs = self.block_size
        input_ids = [s.last_token for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        lens = [s.num_tokens for s in seqs]
        slot_mapping, context_lens, block_tables = self.decode_buffers.fill(
            slots, lens, [s.block_table for s in seqs])
        ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping,
                          attn_backend=self.attn_backend, block_tables=block_tables,
                          context_lens=context_lens, max_context_len=max(lens))
        if self.attn_backend == "triton":
            ctx.decode_splits = decode_splits(len(seqs), self.model.args.num_kv_heads,
                                              ctx.max_context_len, self.device)
        else:
            self.decode_mirror.plan(ctx, [s.seq_id for s in seqs], lens)
        return self._tensor(input_ids), self._tensor(positions), ctx

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool,
            lora_slots: dict[int, int] | None = None) -> torch.Tensor:
        """Logits [len(seqs), vocab] for the next token of every sequence."""
        if is_prefill:
            input_ids, positions, ctx, last_rows = self.prepare_prefill(seqs)
        else:
            input_ids, positions, ctx = self.prepare_decode(seqs)
            last_rows = None
        if lora_slots:
            seq_slots = [lora_slots[s.lora_int_id] if s.lora_int_id else -1 for s in seqs]
            token_slots = ([slot for s, slot in zip(seqs, seq_slots) for _ in range(s.num_tokens)]
                           if is_prefill else seq_slots)
            ctx.lora_meta = LoRABatchMeta.make(token_slots, self.device)
        with step_context(ctx):
            hidden = self.model(input_ids, positions)
            if last_rows is not None:
                hidden = hidden.index_select(0, self._tensor(last_rows))
            return self.model.compute_logits(hidden)

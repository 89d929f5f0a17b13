"""One memory budget for the KV cache and the adapter slots.

    budget  =  adapter slots (max_loras x max_lora_rank, every LoRA-wrapped layer,
               + the rows of lora_extra_vocab_size added tokens)
            +  KV cache blocks
            (+ a draft model's KV cache: as many blocks, of its own size)

On a GPU the budget is what `gpu_memory_utilization` leaves after the weights: the slot
buffers are allocated first, so the KV cache is sized from what they leave. On the CPU
it is `cpu_kv_cache_gib`, and the slots are taken out of it here. A config whose slots
leave too little KV cache for one sequence of `max_model_len` is refused, with numbers.
A draft model's weights (speculative decoding) are loaded before the budget is measured
on a GPU, so they come out of it like the target's; its KV cache is sized with the
target's (ModelRunner: the budget over the two caches' bytes per block).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from loraplex.config import CacheConfig
from loraplex.lora.manager import LoRAManager


@dataclass
class MemoryPlan:
    lora_slot_bytes: int  # all max_loras slots
    bytes_per_rank: int  # one slot at rank 1 (a slot of rank r costs r times this)
    kv_block_bytes: int
    block_size: int
    max_model_len: int
    num_kv_blocks: int = 0
    budget: int | None = None  # known up front on the CPU; else what KV + slots took
    fixed_slot_bytes: int = 0  # per slot whatever the rank: the added-token rows
    kv_dtype: torch.dtype | None = None  # what kv_block_bytes counted (FP8: 1 byte a value)
    draft_kv_block_bytes: int = 0  # a draft model's cache, per block (0: none)
    draft_weight_bytes: int = 0

    @property
    def draft_kv_bytes(self) -> int:
        return self.num_kv_blocks * self.draft_kv_block_bytes

    @property
    def kv_bytes(self) -> int:
        return self.num_kv_blocks * self.kv_block_bytes

    @property
    def budget_bytes(self) -> int:
        return self.budget if self.budget is not None else (self.kv_bytes + self.lora_slot_bytes
                                                            + self.draft_kv_bytes)

    def slot_bytes(self, rank: int) -> int:
        return rank * self.bytes_per_rank + self.fixed_slot_bytes

    def max_slots(self, rank: int) -> int:
        """Adapter slots of `rank` the budget could hold, keeping KV for one full-length
        sequence (what `max_loras` could be raised to at that `max_lora_rank`)."""
        if not self.bytes_per_rank:
            return 0
        min_kv = -(-self.max_model_len // self.block_size) * (self.kv_block_bytes
                                                              + self.draft_kv_block_bytes)
        return max(0, (self.budget_bytes - min_kv) // self.slot_bytes(rank))

    def host_tier_bytes(self, max_cpu_loras: int, max_lora_rank: int) -> int:
        """At most the weights the host tier holds: adapters are kept in the slot layout,
        so one takes at most a slot of max_lora_rank (all layers and slices targeted).
        Allocator rounding (pinned memory) and adapters being read come on top."""
        return max_cpu_loras * self.slot_bytes(max_lora_rank)

    def describe(self, max_lora_rank: int, max_cpu_loras: int = 0) -> str:
        dtype = f" ({str(self.kv_dtype).removeprefix('torch.')})" if self.kv_dtype else ""
        kv = (f"KV cache{dtype} {self.kv_bytes / 2**20:.1f} MiB = "
              f"{self.num_kv_blocks * self.block_size} tokens")
        if self.draft_kv_block_bytes:
            kv += (f"; draft model: weights {self.draft_weight_bytes / 2**20:.1f} MiB, KV "
                   f"cache {self.draft_kv_bytes / 2**20:.1f} MiB ({self.num_kv_blocks} blocks, "
                   "from the same budget)")
        if not self.bytes_per_rank:
            return kv
        ranks = sorted({8, 16, 64, max_lora_rank})
        fits = ", ".join(f"r{r}: {self.max_slots(r)}" for r in ranks)
        host = self.host_tier_bytes(max_cpu_loras, max_lora_rank)
        return (f"{kv}; adapter slots {self.lora_slot_bytes / 2**20:.1f} MiB "
                f"({self.slot_bytes(max_lora_rank) / 2**20:.2f} MiB each at rank "
                f"{max_lora_rank}); slots this budget could hold by rank: {fits}; host "
                f"tier: {max_cpu_loras} adapters, at most {host / 2**20:.1f} MiB of weights "
                "(pinned on CUDA, whose allocator rounds each buffer up to a power of 2)")


def kv_cache_layout(args) -> tuple[int, int, int]:
    """(tensors, KV heads, head dim) of each layer's cache: K and V of num_kv_heads x
    head_dim; for MLA (layers/mla.py) one tensor, the latent [c, kr], that is both."""
    if args.mla is not None:
        return 1, 1, args.mla.latent_dim
    return 2, args.num_kv_heads, args.head_dim


def kv_block_bytes(model, dtype: torch.dtype, block_size: int) -> int:
    """The cache of `block_size` tokens in every layer (K and V, or MLA's latent; Gemma
    4's: in every layer that keeps one, of its own shape)."""
    a = model.args
    elem = torch.tensor([], dtype=dtype).element_size()
    if a.gemma4 is not None:  # each layer its own shape; the layers that reuse another's
        # K/V (KV sharing) hold none
        g = a.gemma4
        return 2 * block_size * elem * sum(g.kv_heads[i] * g.head_dims[i]
                                           for i in g.cache_layers())
    tensors, heads, head_dim = kv_cache_layout(a)
    return tensors * a.num_attention_layers * block_size * heads * head_dim * elem


def plan_memory(lora: LoRAManager | None, kv_block_bytes: int, block_size: int,
                max_model_len: int, kv_dtype: torch.dtype | None = None) -> MemoryPlan:
    if lora is None:
        return MemoryPlan(lora_slot_bytes=0, bytes_per_rank=0, kv_block_bytes=kv_block_bytes,
                          block_size=block_size, max_model_len=max_model_len,
                          kv_dtype=kv_dtype)
    plan = MemoryPlan(lora_slot_bytes=0, bytes_per_rank=lora.slot_bytes_per_rank(),
                      kv_block_bytes=kv_block_bytes, block_size=block_size,
                      max_model_len=max_model_len,
                      fixed_slot_bytes=lora.fixed_slot_bytes(), kv_dtype=kv_dtype)
    plan.lora_slot_bytes = plan.slot_bytes(lora.cfg.max_lora_rank) * lora.cfg.max_loras
    return plan


def cpu_cache_config(cfg: CacheConfig, plan: MemoryPlan, device_type: str) -> CacheConfig:
    """On the CPU the slots come out of cpu_kv_cache_gib: the KV cache gets the rest.
    An explicit KV size (kv_cache_memory_bytes, num_gpu_blocks_override) is kept as given."""
    if device_type != "cpu" or cfg.kv_cache_bytes is not None \
            or cfg.num_blocks_override is not None:
        return cfg
    budget = plan.budget = int(cfg.cpu_kv_cache_gib * 2**30)
    if plan.lora_slot_bytes >= budget:
        raise ValueError(
            f"the adapter slots need {plan.lora_slot_bytes / 2**30:.2f} GiB but the cache "
            f"budget is cpu_kv_cache_gib={cfg.cpu_kv_cache_gib}: lower max_loras or "
            "max_lora_rank, or raise cpu_kv_cache_gib")
    return replace(cfg, kv_cache_bytes=budget - plan.lora_slot_bytes)

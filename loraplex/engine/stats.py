"""EngineStats: the engine's counters at one moment (LLMEngine.get_stats), which the
server's /metrics (metrics.py) and its periodic log line read: queue lengths and their
adapters, KV blocks, preemptions, the prefix cache, the adapter tiers, speculative
decoding."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from loraplex.engine.block_manager import BlockManager
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.spec_decode import SpecDecodeStats
from loraplex.lora.manager import LoRACacheStats, LoRAManager


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    running_lora_names: list[str]
    waiting_lora_names: list[str]
    max_loras: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    # prefix caching, cumulative: prompt tokens looked up at admission, and found cached
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # adapter tiers (zeros with LoRA off): how many are registered / in host memory /
    # in device slots / being read now, and the cumulative cache counters
    num_registered_loras: int = 0
    num_host_loras: int = 0
    num_slot_loras: int = 0
    num_loading_loras: int = 0
    lora_cache: LoRACacheStats | None = None
    lora_load_seconds: list[float] = field(default_factory=list)  # loads since last call
    # speculative decoding, cumulative (None: off)
    spec_decode: SpecDecodeStats | None = None


def collect_stats(scheduler: Scheduler, block_manager: BlockManager,
                  lora_manager: LoRAManager | None, max_loras: int,
                  spec_stats: SpecDecodeStats | None) -> EngineStats:
    """The counters now; the adapters' load times since the last call (drained)."""
    def names(seqs: Iterable[Sequence]) -> list[str]:
        """The adapters' names, by distinct id: with thousands of requests queued
        this runs every step. An unfinished request's id stays registered
        (remove_lora defers), so the registry names them all."""
        ids = {s.lora_int_id for s in seqs} - {0, None}
        registered = lora_manager.registered if lora_manager else {}
        return sorted({registered[i].lora_name for i in ids if i in registered})

    lm = lora_manager
    lora = {}
    if lm is not None:
        lora = dict(num_registered_loras=len(lm.registered), num_host_loras=lm.num_host,
                    num_slot_loras=lm.num_slots_used,
                    num_loading_loras=lm.loader.num_inflight,
                    lora_cache=replace(lm.stats),
                    lora_load_seconds=lm.loader.drain_latencies())
    return EngineStats(
        **lora,
        num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
        running_lora_names=names(scheduler.running),
        waiting_lora_names=names(scheduler.waiting),
        max_loras=max_loras,
        num_free_blocks=block_manager.num_free_blocks,
        num_total_blocks=block_manager.num_blocks,
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queries=block_manager.num_query_tokens,
        prefix_cache_hits=block_manager.num_hit_tokens,
        spec_decode=spec_stats.copy() if spec_stats else None)

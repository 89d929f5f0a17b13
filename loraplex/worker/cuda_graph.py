"""Decode steps as CUDA graphs: captured once per batch size, replayed with new inputs.

A decode step launches a few hundred small kernels (tens per layer); replaying them as one
graph takes the host's launch cost off the step. Graphs are captured at start-up, after
the KV cache and the adapter slots exist, largest batch first, into one shared memory
pool. A graph of batch size bs reads its inputs from the first bs rows of the runner's
DecodeBuffers and, with LoRA, from a LoRABatchMeta of its own (max_tokens = bs); all of
them are refilled in place before a replay. A smaller batch is padded to the next size
(pad rows: slot -1, context 0, no adapter). Adapter weights and ranks are read from the
slot buffers, so an adapter swapped into a slot needs no recapture.

With LoRA layers there are two graphs per size: one with every LoRA layer's ops in it
(a slot without weights there has rank 0 and costs an early exit), one without any (for
a batch of base requests only, which then pays nothing for LoRA).

Each graph is replayed once at start-up against an eager forward over the same inputs. A
failed capture or check is logged with its exception and decode stays eager.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time

import torch
from torch import nn

from loraplex.layers.attention import Attention, decode_splits
from loraplex.lora import ops
from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.meta import LoRABatchMeta
from loraplex.worker.context import DecodeBuffers, StepContext, step_context

logger = logging.getLogger(__name__)

_CHECK_TOL = {torch.float32: 1e-3}  # relative error of a replay vs eager; else 2e-2


def capture_sizes(max_num_seqs: int, sizes: tuple[int, ...] | None = None) -> list[int]:
    """The batch sizes to capture: None = 1, 2, 4, 8..64 by 8, ..128 by 16, ..256 by 32,
    then by 64, up to max_num_seqs and max_num_seqs itself, so every decode batch has a
    graph; one value = the same up to it; several values = those (up to max_num_seqs)."""
    if sizes is not None and len(sizes) > 1:
        return sorted({n for n in sizes if n <= max_num_seqs})
    top = max_num_seqs if sizes is None else min(sizes[0], max_num_seqs)
    steps = [1, 2, 4, *range(8, 65, 8), *range(80, 129, 16), *range(160, 257, 32),
             *range(320, top, 64)]
    return sorted({n for n in steps if n < top} | {top})


def padded_size(n: int, sizes: list[int]) -> int | None:
    """The smallest captured size >= n (None: larger than any, run eagerly)."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def graphs_unavailable(device: torch.device, enforce_eager: bool, attn_backend: str,
                       has_lora: bool, host_routed: bool = False) -> str | None:
    """Why decode must run eagerly here, or None when it can use CUDA graphs."""
    if device.type != "cuda":
        return "not a CUDA device"
    if enforce_eager:
        return "enforce_eager=True"
    if host_routed:
        return "a mixture-of-experts model (tokens are grouped by expert on the host)"
    if attn_backend != "triton":  # the torch decode path keeps host-side state per step
        return f"attention backend {attn_backend!r} (graphs need 'triton')"
    if has_lora and ops.backend(torch.empty(0, device=device)) is ops.torch_ops:
        return "LoRA ops backend 'torch' (its grouping is decided on the host each step)"
    return None


class CUDAGraphRunner:
    def __init__(self, model: nn.Module, buffers: DecodeBuffers, sizes: list[int],
                 max_model_len: int, max_loras: int) -> None:
        self.model = model
        self.buffers = buffers
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.max_loras = max_loras  # 0: the model has no LoRA layers
        self.device = buffers.input_ids.device
        self.metas: dict[int, LoRABatchMeta] = {}
        # (batch size, with LoRA ops) -> (graph, its output: hidden states [bs, hidden])
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0

    def padded_size(self, n: int) -> int | None:
        return padded_size(n, self.sizes)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        variants = (True, False) if self.max_loras else (False,)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            if self.max_loras:
                meta = self.metas[bs] = LoRABatchMeta(bs, self.max_loras, self.device,
                                                      block_m=16)
                meta.skip_unused_layers = False  # a host decision the graph would bake in
            for lora in variants:
                self.graphs[bs, lora] = self._capture_one(bs, lora, pool)
        for bs, lora in self.graphs:
            self._check(bs, lora)

    def replay(self, bs: int, token_slots: list[int] | None) -> torch.Tensor:
        """Hidden states [bs, hidden] of the step whose inputs fill the buffers' first bs
        rows. token_slots: each row's adapter slot (-1 = none; bs of them), or None for a
        batch without adapters. The result is the graph's own memory: the next replay
        overwrites it."""
        if token_slots is not None:
            self.metas[bs].prepare(token_slots)
        graph, out = self.graphs[bs, token_slots is not None]
        graph.replay()
        self.num_replays += 1
        return out

    def _context(self, bs: int, lora: bool) -> StepContext:
        b = self.buffers
        kv_heads = next(m for m in self.model.modules() if isinstance(m, Attention)).num_kv_heads
        # splits from max_model_len: the graph serves every context length up to it
        return StepContext(
            is_prefill=False, slot_mapping=b.slot_mapping[:bs], attn_backend="triton",
            block_tables=b.block_tables[:bs], context_lens=b.context_lens[:bs],
            max_context_len=self.max_model_len,
            decode_splits=decode_splits(bs, kv_heads, self.max_model_len, self.device),
            lora_meta=self.metas[bs] if lora else None)

    def _forward(self, bs: int, ctx: StepContext) -> torch.Tensor:
        with step_context(ctx):
            return self.model(self.buffers.input_ids[:bs], self.buffers.positions[:bs])

    def _prepare_capture(self, bs: int, lora: bool) -> StepContext:
        b = self.buffers
        for t, value in ((b.input_ids, 0), (b.positions, 0), (b.slot_mapping, -1),
                         (b.context_lens, 0)):
            t[:bs].fill_(value)  # a step of padding only: no cache writes, no reads
        if lora:
            self.metas[bs].prepare([-1] * bs)
        return self._context(bs, lora)

    def _capture_one(self, bs: int, lora: bool, pool: tuple) -> tuple[torch.cuda.CUDAGraph,
                                                                       torch.Tensor]:
        ctx = self._prepare_capture(bs, lora)
        self._forward(bs, ctx)  # warm-up: Triton compiles outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: adapter-loader threads may pin host memory meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._forward(bs, ctx)
        return graph, out

    def _check(self, bs: int, lora: bool) -> None:
        """Replay on random inputs (over the first blocks of the cache, filled with random
        K/V, zeroed again after) against an eager forward of the same step."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        num_blocks, block_size = layers[0].k_cache.shape[:2]
        used = min(num_blocks, 64)
        gen = torch.Generator().manual_seed(bs)
        b = self.buffers
        width = b.block_tables.shape[1]
        lens = torch.randint(1, min(self.max_model_len, width * block_size) + 1, (bs,),
                             generator=gen)
        b.block_tables[:bs] = torch.randint(0, used, (bs, width), generator=gen).to(self.device)
        b.context_lens[:bs] = lens.to(self.device, torch.int32)
        b.positions[:bs] = (lens - 1).to(self.device)
        b.input_ids[:bs] = torch.randint(0, self.model.args.vocab_size, (bs,),
                                         generator=gen).to(self.device)
        b.slot_mapping[:bs] = -1  # rows may share blocks: no writes, only reads
        for layer in layers:
            for cache in (layer.k_cache, layer.v_cache):  # (FP8 has no normal_)
                cache[:used].copy_(torch.randn(cache[:used].shape, device=cache.device))
        lora_layers = [m for m in self.model.modules() if isinstance(m, LinearWithLoRA)]
        try:
            if lora:
                slots = torch.randint(-1, self.max_loras, (bs,), generator=gen).tolist()
                slots[0] = bs % self.max_loras  # at least one row with an adapter
                self.metas[bs].prepare(slots)
                _fill_random_adapters(lora_layers, gen)
            want = self._forward(bs, self._context(bs, lora)).clone()
            graph, got = self.graphs[bs, lora]
            graph.replay()
            err = float((got.float() - want.float()).norm()
                        / want.float().norm().clamp_min(1e-30))
        finally:  # the cache and the slots go back to empty, whatever happened
            for layer in layers:
                for cache in (layer.k_cache, layer.v_cache):
                    cache[:used].zero_()
            for layer in lora_layers if lora else []:
                for slot in range(self.max_loras):
                    layer.reset_lora(slot)
        tol = _CHECK_TOL.get(want.dtype, 2e-2)
        if not err <= tol:  # NaN fails too
            raise RuntimeError(f"the CUDA graph of batch {bs} ({'with' if lora else 'without'}"
                               f" LoRA) differs from the eager forward on the same inputs: "
                               f"relative error {err:.3g} > {tol}")


def _fill_random_adapters(layers: list[LinearWithLoRA], gen: torch.Generator) -> None:
    """Random weights of random ranks (1..max) in every slot, so the start-up check runs
    the LoRA graph doing LoRA work: graphs are captured before any adapter is loaded, and
    with every rank 0 the LoRA kernels return at once. reset_lora empties them after."""
    for layer in layers:
        assert not any(layer.slot_ranks), "the check runs before any adapter is loaded"
        a, b = layer.lora_a_stacked, layer.lora_b_stacked
        ranks = torch.randint(1, layer.max_rank + 1, (a.shape[0],), generator=gen)
        past = (torch.arange(layer.max_rank) >= ranks[:, None]).to(a.device)  # [slot, rank]
        a.normal_(0.0, a.shape[-1] ** -0.5).masked_fill_(past[:, :, None, None], 0.0)
        b.normal_(0.0, 1.0).masked_fill_(past[:, None, :], 0.0)
        b.mul_(ranks.to(b.device, b.dtype)[:, None, None] ** -0.5)
        layer.lora_ranks.copy_(ranks)
        layer.slot_ranks = ranks.tolist()


def capture_decode_graphs(model: nn.Module, buffers: DecodeBuffers, max_num_seqs: int,
                          max_model_len: int, max_loras: int, enforce_eager: bool,
                          sizes: tuple[int, ...] | None, attn_backend: str,
                          host_routed: bool = False) -> CUDAGraphRunner | None:
    """Capture and check the decode graphs; None (decode runs eagerly) when graphs are
    off or unavailable here (`host_routed`: the model routes tokens on the host, as a
    mixture of experts does), or when capturing failed (logged with the exception)."""
    device = buffers.input_ids.device
    reason = graphs_unavailable(device, enforce_eager, attn_backend, max_loras > 0,
                                host_routed)
    if reason is not None:
        if device.type == "cuda":
            log = logger.info if enforce_eager else logger.warning
            log("CUDA graphs off (%s): decode runs eagerly", reason)
        return None
    runner = CUDAGraphRunner(model, buffers, capture_sizes(max_num_seqs, sizes),
                             max_model_len, max_loras)
    start, reserved = time.perf_counter(), torch.cuda.memory_reserved(device)
    try:
        runner.capture()
        torch.cuda.synchronize(device)
    except Exception:
        logger.exception("CUDA graph capture failed; decode runs eagerly (slower). Report "
                         "this with the traceback; enforce_eager=True skips the capture")
        runner = None
    if runner is None:
        gc.collect()  # the traceback's frames held the graphs
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as e:  # a sticky device error: nothing can run any more
            raise RuntimeError("the failed CUDA graph capture left the GPU unusable") from e
        return None
    logger.info("CUDA graphs: %d captured (batch sizes %s%s) in %.1f s, %.1f MiB",
                len(runner.graphs), runner.sizes, ", with and without LoRA" if max_loras else "",
                time.perf_counter() - start,
                (torch.cuda.memory_reserved(device) - reserved) / 2**20)
    return runner

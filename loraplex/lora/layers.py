"""LoRA-wrapped layers: the base projection plus per-slot adapter weights.

    y = W x  +  B[s] (A[s] x)          s = the token's adapter slot (-1: base only)
    y = E[t] +  B[s] A[s][:, t]        the token embedding: A's column of token t
    y = g[s] * (W x + B[s] (A[s] x))   a DoRA adapter's slot (lora/dora.py), bias unscaled
    y = W x + B[s] (A[s] x) + b[s]     an adapter with lora_bias (PEFT's bias on lora_B)

Weights live in preallocated slot buffers (vLLM's `lora_a_stacked` / `lora_b_stacked`),
one A per packed sub-projection and their B's stacked like the base weight's rows.
Smaller ranks are zero-padded to `max_lora_rank`; `lora_ranks` holds each slot's real
rank so the ops skip the padding; an empty slot is all zeros with rank 0. Invariant:
everything past a slot's rank is zero (the torch fallback on a GPU and a rank bucket
wider than a slot read it).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.linear import Linear
from loraplex.layers.quantization import QuantLinear
from loraplex.lora import dora, ops
from loraplex.lora.extra_vocab import ExtraVocabSlots
from loraplex.lora.full_vocab import FullVocabSlots
from loraplex.lora.meta import LoRABatchMeta
from loraplex.worker.context import get_context


class LinearWithLoRA(nn.Module):
    def __init__(self, base_layer: Linear | QuantLinear, max_loras: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.output_sizes = self._dims(base_layer)
        self.max_rank = max_rank
        device = next(base_layer.parameters()).device
        n, d_in, d_out = len(self.output_sizes), self.in_features, sum(self.output_sizes)
        # A of every sub-projection, rank-major so a slot's first r ranks are one block:
        # [S, R, n, in]; B of all of them, stacked on the output axis like the base
        # weight: [S, sum(out_k), R]
        self.register_buffer("lora_a_stacked", torch.zeros(
            max_loras, max_rank, n, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b_stacked", torch.zeros(
            max_loras, d_out, max_rank, dtype=dtype, device=device), persistent=False)
        # the real rank in each slot (0 = no weights here); kernels loop over it, not over R
        self.register_buffer("lora_ranks", torch.zeros(max_loras, dtype=torch.int32,
                                                       device=device), persistent=False)
        self.slot_ranks = [0] * max_loras  # host copy: skip the op when no active slot has weights
        # DoRA's per-row scale g [S, out] fp32 (1 in other slots), made by the first DoRA
        # adapter to arrive: deployments without one hold nothing for it
        self.magnitude_scale: torch.Tensor | None = None
        self.slot_dora = [False] * max_loras
        # lora_bias's b [S, out] (0 in other slots), made by the first such adapter
        self.lora_bias: torch.Tensor | None = None
        self.slot_bias = [False] * max_loras

    @staticmethod
    def _dims(base_layer: nn.Module) -> tuple[int, list[int]]:
        """(in_features, output_sizes) of the wrapped layer, as the slots see it."""
        return base_layer.in_features, list(base_layer.output_sizes)

    def base_weight(self) -> torch.Tensor:
        """The base's W [out, in] as its forward uses it (a quantized one dequantized)."""
        base = self.base_layer
        return base.dequantize(torch.float32).T if isinstance(base, QuantLinear) else base.weight

    def pack(self, lora_a: list[torch.Tensor | None], lora_b: list[torch.Tensor | None],
             pin_memory: bool = False, magnitudes: list[torch.Tensor | None] | None = None,
             biases: list[torch.Tensor | None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One adapter's sub-projections (A_k [r_k, in], B_k [out_k, r_k]; None = not
        targeted) in the layout of one slot, on the host: A [r, n, in], B [sum(out_k), r],
        r = the largest r_k; absent slices and ranks past a slice's own are zeros (so a
        q,v-only adapter keeps k's rows too: one copy per buffer beats three). With DoRA
        (`magnitudes`: m_k [out_k]), also g [sum(out_k)] fp32, 1 on untargeted rows;
        with lora_bias (`biases`: b_k [out_k], scaled), b [sum(out_k)], 0 on untargeted
        rows; else None."""
        rank = max(a.shape[0] for a in lora_a if a is not None)
        a_slot = torch.zeros(rank, len(self.output_sizes), self.in_features,
                             dtype=self.lora_a_stacked.dtype, pin_memory=pin_memory)
        b_slot = torch.zeros(sum(self.output_sizes), rank, dtype=self.lora_b_stacked.dtype,
                             pin_memory=pin_memory)
        magnitudes = magnitudes or [None] * len(self.output_sizes)
        g = (torch.ones(sum(self.output_sizes), pin_memory=pin_memory)
             if any(m is not None for m in magnitudes) else None)
        weight = self.base_weight() if g is not None else None
        biases = biases or [None] * len(self.output_sizes)
        bias = (torch.zeros(sum(self.output_sizes), dtype=self.lora_b_stacked.dtype,
                            pin_memory=pin_memory)
                if any(b is not None for b in biases) else None)
        col = 0
        for k, (a, b, out) in enumerate(zip(lora_a, lora_b, self.output_sizes, strict=True)):
            if a is not None:
                a_slot[:a.shape[0], k] = a
                b_slot[col:col + out, :a.shape[0]] = b
                if magnitudes[k] is not None:
                    g[col:col + out] = dora.magnitude_scale(weight[col:col + out], a, b,
                                                            magnitudes[k])
                if biases[k] is not None:
                    bias[col:col + out] = biases[k]
            col += out
        return a_slot, b_slot, g, bias

    def set_lora(self, slot: int, lora_a: list[torch.Tensor | None],
                 lora_b: list[torch.Tensor | None],
                 magnitudes: list[torch.Tensor | None] | None = None,
                 biases: list[torch.Tensor | None] | None = None) -> None:
        """Copy one adapter into `slot`; a None sub-projection stays zero."""
        self.set_packed(slot, *self.pack(lora_a, lora_b, magnitudes=magnitudes,
                                         biases=biases))

    def set_packed(self, slot: int, a: torch.Tensor, b: torch.Tensor,
                   g: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Copy pack()'s output into `slot`: two copies (one more each for DoRA's scales
        and a bias), and zeros over ranks the slot's last adapter used beyond this one's."""
        rank, old = a.shape[0], self.slot_ranks[slot]
        if old > rank:
            self.lora_a_stacked[slot, rank:old].zero_()
            self.lora_b_stacked[slot, :, rank:old].zero_()
        self.lora_a_stacked[slot, :rank].copy_(a, non_blocking=True)
        self.lora_b_stacked[slot, :, :rank].copy_(b, non_blocking=True)
        self.lora_ranks[slot] = self.slot_ranks[slot] = rank
        if g is not None:
            if self.magnitude_scale is None:
                self.magnitude_scale = torch.ones(len(self.slot_dora), len(g),
                                                  device=self.lora_ranks.device)
            self.magnitude_scale[slot].copy_(g, non_blocking=True)
            self.slot_dora[slot] = True
        elif self.slot_dora[slot]:
            self._reset_dora(slot)
        if bias is not None:
            if self.lora_bias is None:
                self.lora_bias = torch.zeros(len(self.slot_bias), len(bias),
                                             dtype=self.lora_b_stacked.dtype,
                                             device=self.lora_ranks.device)
            self.lora_bias[slot].copy_(bias, non_blocking=True)
            self.slot_bias[slot] = True
        elif self.slot_bias[slot]:
            self._reset_bias(slot)

    def _reset_dora(self, slot: int) -> None:
        self.magnitude_scale[slot].fill_(1.0)
        self.slot_dora[slot] = False

    def _reset_bias(self, slot: int) -> None:
        self.lora_bias[slot].zero_()
        self.slot_bias[slot] = False

    def reset_lora(self, slot: int) -> None:
        """Zero the slot. Only its first slot_ranks[slot] ranks can hold weights (set_lora
        writes no further), so only those are cleared: swapping adapters in and out of
        slots is a hot path when more adapters are active than max_loras."""
        if self.slot_dora[slot]:
            self._reset_dora(slot)
        if self.slot_bias[slot]:
            self._reset_bias(slot)
        rank = self.slot_ranks[slot]
        if rank == 0:
            return  # already all zeros
        self.lora_a_stacked[slot, :rank].zero_()
        self.lora_b_stacked[slot, :, :rank].zero_()
        self.lora_ranks[slot] = self.slot_ranks[slot] = 0

    def slot_bytes_per_rank(self) -> int:
        """Bytes of one slot at rank 1: a row of A per slice and a column of B."""
        elem = self.lora_a_stacked.element_size()
        return (len(self.output_sizes) * self.in_features + sum(self.output_sizes)) * elem

    def _meta(self) -> LoRABatchMeta | None:
        """The step's LoRA metadata, or None when no token's slot has weights here."""
        meta = get_context().lora_meta
        if meta is None or (meta.skip_unused_layers
                            and not any(self.slot_ranks[s] for s in meta.active_slot_list)):
            return None
        return meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_lora(self.base_layer(x), x, self._meta())

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, meta: LoRABatchMeta | None
                  ) -> torch.Tensor:
        """y (the base's output on x [T, in]) plus each row's adapter's terms under `meta`
        (None: y as it is)."""
        if meta is not None:
            ops.add_lora(y, x, self.lora_a_stacked, self.lora_b_stacked, self.lora_ranks, meta,
                         self.output_sizes)
            if self._dora_active(meta):
                y = dora.rescale(y, self.base_layer.bias, self.magnitude_scale,
                                 meta.token_lora_indices[:y.shape[0]])
            if self._bias_active(meta):
                y = y + self._slot_bias(meta.token_lora_indices[:y.shape[0]]).to(y.dtype)
        return y

    def _slot_bias(self, slots: torch.Tensor) -> torch.Tensor:
        """[T, out]: each token's adapter's lora_B bias (0 for the base, slot -1)."""
        return self.lora_bias[slots.clamp(min=0)] * (slots >= 0)[:, None]

    def _bias_active(self, meta: LoRABatchMeta) -> bool:
        """An adapter with lora_bias is in the step; a host decision, as DoRA's."""
        return self.lora_bias is not None and meta.skip_unused_layers and any(
            self.slot_bias[s] for s in meta.active_slot_list)

    def _dora_active(self, meta: LoRABatchMeta) -> bool:
        """A DoRA adapter's slot is in the step. Never inside a CUDA graph (the model
        runner decodes a batch with one eagerly): the check is a host decision."""
        return self.magnitude_scale is not None and meta.skip_unused_layers and any(
            self.slot_dora[s] for s in meta.active_slot_list)


class EmbeddingWithLoRA(LinearWithLoRA):
    """The token embedding with PEFT's embedding LoRA (lora_embedding_A [r, vocab],
    lora_embedding_B [hidden, r]): A times a one-hot token is A's column of that token,
    so the slots are a linear layer's with in_features = vocab, and the shrink is a
    gather of one column per token instead of a matmul. The expand is the shared op."""

    @staticmethod
    def _dims(base_layer: nn.Module) -> tuple[int, list[int]]:
        return base_layer.num_embeddings, [base_layer.embedding_dim]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_vocab: ExtraVocabSlots | None = None  # added tokens' rows (LoRAManager's)
        self.full_vocab: FullVocabSlots | None = None  # whole tables (modules_to_save)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        meta = get_context().lora_meta
        extra, full = self.extra_vocab, self.full_vocab
        every = meta is not None and not meta.skip_unused_layers  # (a graph's capture)
        use_extra = extra is not None and meta is not None and (
            every or extra.any_active(meta.active_slot_list))
        use_full = full is not None and meta is not None and (
            every or full.any_active("embed_tokens", meta.active_slot_list))
        if not (use_extra or use_full):
            return self._embed(input_ids, self._meta())
        slots = meta.token_lora_indices[:input_ids.shape[0]].long()
        vocab = (extra or full).vocab_size
        y = self._embed(input_ids.clamp(max=vocab - 1), self._meta())
        if use_extra:  # added tokens (ids >= the base vocabulary): their slot's own row
            y = extra.embed(input_ids, slots, y)
        if use_full:  # a slot with a whole table: its row instead of the base's
            y = full.embed(input_ids, slots, y)
        return y

    def _embed(self, input_ids: torch.Tensor, meta: LoRABatchMeta | None) -> torch.Tensor:
        y = self.base_layer(input_ids)
        if meta is None:
            return y
        n = input_ids.shape[0]
        slots = meta.token_lora_indices[:n].long()
        # [T, R]: column t of slot s's A (slot 0's for base tokens, zeroed: no host sync,
        # no shape that depends on the data, so a CUDA graph can hold it)
        cols = self.lora_a_stacked[slots.clamp(min=0), :, 0, input_ids].float()
        cols.mul_((slots >= 0).unsqueeze(1))
        ops.lora_expand(cols.view(1, n, 1, self.max_rank), self.lora_b_stacked, y,
                        self.lora_ranks, meta, self.output_sizes)
        return y

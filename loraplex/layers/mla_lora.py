"""LoRA on MLA's kv_b_proj in both of layers/mla.py's forms, absorbed and decompressed.

The cache holds the latent c, never kv_b_proj's output, so in the absorbed form (decode)
an adapter's delta goes through the same absorption as the base weight. With the slot's
A [r, C] and B [H (nope + v), r] (the scaling s folded into B at load, lora/adapter.py),
B_K_h / B_V_h head h's K and V rows, q_h its query's nope part and o_h = sum_j p_hj c_j
its attention over the latent:

    k_h = (W_UK_h + B_K_h A) c    ->   q_latent_h = W_UK_h^T q_h + A^T (B_K_h^T q_h)
    v_h = (W_UV_h + B_V_h A) c    ->   out_h      = W_UV_h o_h   + B_V_h (A o_h)

DoRA's row scale g (lora/dora.py) multiplies kv_b_proj's output rows: on the K rows it
moves onto the query (q_h * g_K_h, before absorbing), on the V rows onto out_h.
lora_bias b adds b_K_h to every key of head h, i.e. the same logit q_h . b_K_h for all
of a query's keys, which softmax ignores; and b_V_h to out_h (the weights sum to 1).

The decompressed form (the torch path's prefill) applies the adapter as PEFT does, to
kv_b_proj's output on each latent row of a sequence, its cached context included (every
row has the sequence's slot): (W + B A) c, times DoRA's g, plus lora_bias
(add_to_output).

Per active slot, its rows are gathered and the delta added back (PEFT's mixed batch);
inside a CUDA graph (no host-side slot list) every slot runs over every row, masked to
its own. Slot -1 (the base) gets nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.meta import LoRABatchMeta


@dataclass
class KvBLoRA:
    """The step's adapters on one kv_b_proj, split per head into K rows and V rows."""

    layer: LinearWithLoRA
    meta: LoRABatchMeta
    num_heads: int
    nope: int  # qk_nope_head_dim: each head's first rows are K's, the rest V's
    slots: torch.Tensor  # [rows]: the adapter slot of each row it is applied to, -1 = base

    def for_rows(self, slots: torch.Tensor) -> KvBLoRA:
        """The same adapters over other rows (a sequence's cached latents, say)."""
        return replace(self, slots=slots)

    def _split_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, H (nope + v)] -> each head's K part [T, H, nope] and V part [T, H, v]."""
        per_head = x.view(x.shape[0], self.num_heads, -1)
        return per_head[..., :self.nope], per_head[..., self.nope:]

    def _slot_groups(self) -> Iterator[tuple[int, int, torch.Tensor | None,
                                             torch.Tensor | None]]:
        """(slot, rank, its rows, None) per active slot with weights here; in a CUDA graph
        (skip_unused_layers False) every slot at full rank: (slot, R, None, mask)."""
        slots = self.slots
        if not self.meta.skip_unused_layers:
            for s in range(self.layer.lora_a_stacked.shape[0]):
                yield s, self.layer.max_rank, None, (slots == s)
            return
        for s in self.meta.active_slot_list:
            if self.layer.slot_ranks[s]:
                yield s, self.layer.slot_ranks[s], (slots == s).nonzero().squeeze(1), None

    def _add(self, out: torch.Tensor, x: torch.Tensor,
             delta: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
        """out[i] += delta(x[i], slot, rank) for each row i of an adapter's slot."""
        for s, rank, rows, mask in self._slot_groups():
            if rows is None:
                out += (delta(x, s, rank) * mask.view(-1, *[1] * (out.dim() - 1))).to(out.dtype)
            else:
                out.index_add_(0, rows, delta(x.index_select(0, rows), s, rank).to(out.dtype))

    def _a(self, s: int, rank: int) -> torch.Tensor:
        return self.layer.lora_a_stacked[s, :rank, 0].float()  # [r, C]

    def _b(self, s: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.layer.lora_b_stacked[s, :, :rank].float().view(self.num_heads, -1, rank)
        return b[:, :self.nope], b[:, self.nope:]  # [H, nope, r], [H, v, r]

    def _row_scale(self) -> torch.Tensor | None:
        """DoRA's g per row, [rows, H (nope + v)] (1 for the base), or None."""
        if not self.layer._dora_active(self.meta):
            return None
        slots = self.slots.long()
        g = self.layer.magnitude_scale[slots.clamp(min=0)]
        return torch.where((slots >= 0).unsqueeze(1), g, 1.0)

    def scale_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_h * g_K_h (DoRA's K rows); q_nope [T, H, nope] as it is without DoRA."""
        g = self._row_scale()
        return q_nope if g is None else (q_nope.float() * self._split_rows(g)[0]
                                         ).to(q_nope.dtype)

    def add_query(self, q_latent: torch.Tensor, q_nope: torch.Tensor) -> None:
        """q_latent_h += A^T (B_K_h^T q_h); q_latent [T, H, C], q_nope [T, H, nope]."""
        def delta(q: torch.Tensor, s: int, rank: int) -> torch.Tensor:
            u = torch.einsum("thn,hnr->thr", q.float(), self._b(s, rank)[0])
            return u @ self._a(s, rank)
        self._add(q_latent, q_nope, delta)

    def add_value(self, v: torch.Tensor, o_latent: torch.Tensor) -> torch.Tensor:
        """out_h + B_V_h (A o_h), then DoRA's g_V_h and lora_bias's b_V_h; v [T, H, v],
        o_latent [T, H, C]."""
        def delta(o: torch.Tensor, s: int, rank: int) -> torch.Tensor:
            z = o.float() @ self._a(s, rank).T  # [t, H, r]
            return torch.einsum("thr,hvr->thv", z, self._b(s, rank)[1])
        self._add(v, o_latent, delta)
        g = self._row_scale()
        if g is not None:
            v = (v.float() * self._split_rows(g)[1]).to(v.dtype)
        if self.layer._bias_active(self.meta):
            v = v + self._split_rows(self.layer._slot_bias(self.slots))[1].to(v.dtype)
        return v

    def add_to_output(self, kv: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """kv_b_proj's output with each row's adapter, in LinearWithLoRA's order: the base's
        kv [rows, H (nope + v)] + B A c, times DoRA's g, plus lora_bias; latent [rows, C]."""
        def delta(c: torch.Tensor, s: int, rank: int) -> torch.Tensor:
            b = self.layer.lora_b_stacked[s, :, :rank].float()  # [H (nope + v), r]
            return (c.float() @ self._a(s, rank).T) @ b.T
        self._add(kv, latent, delta)
        g = self._row_scale()
        if g is not None:
            kv = (kv.float() * g).to(kv.dtype)
        if self.layer._bias_active(self.meta):
            kv = kv + self.layer._slot_bias(self.slots).to(kv.dtype)
        return kv


def kv_b_lora(module: torch.nn.Module, num_heads: int, nope: int, rows: slice
              ) -> KvBLoRA | None:
    """The step's adapters on kv_b_proj over the step's `rows`, or None (not wrapped, or
    no token's adapter has weights there)."""
    if not isinstance(module, LinearWithLoRA):
        return None
    meta = module._meta()
    return None if meta is None else KvBLoRA(module, meta, num_heads, nope,
                                             meta.token_lora_indices[rows])

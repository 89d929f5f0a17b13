"""LoRA on a mixture of experts' experts: per slot, per expert, an A and a B for each
projection.

    h = W13_e x + [B1[s,e] A1[s,e] x ; B3[s,e] A3[s,e] x]     gate and up (W1, W3)
    y = W2_e a  + B2[s,e] A2[s,e] a,   a = silu(h_gate) * h_up  down (W2)

s = the token's adapter slot, e = the expert it was routed to. Experts without a gate
(Nemotron-H's) have the up slice alone: h = W1_e x + B1 A1 x, a = act(h). The slots hold what a
PEFT adapter on transformers 4 saves (per expert: experts.{e}.w1 / w2 / w3, or
gate_proj / up_proj / down_proj) and what one on transformers 5 saves for the fused
experts (target_parameters gate_up_proj, down_proj: one A for gate and up, which goes
into both slices). FusedExperts groups the (token, expert) pairs by expert, then by slot,
so each (expert, slot) run is two small matmuls per projection here.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.experts import ExpertGroup, FusedExperts
from loraplex.worker.context import get_context

# an adapter's run of at least this many rows in an expert gets its own matmuls; shorter
# runs are gathered into one batched matmul, each row with its slot's weights
_LONG_RUN = 8


class ExpertsWithLoRA(nn.Module):
    def __init__(self, base_layer: FusedExperts, max_loras: int, max_rank: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        e, h, i = base_layer.num_experts, base_layer.hidden_size, base_layer.intermediate_size
        device = base_layer.w13.device
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.max_rank = max_rank
        self.projections = base_layer.w13_projections  # ("gate", "up"), or ("up",)
        n = len(self.projections)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(max_loras, *shape, dtype=dtype, device=device)

        # gate (slice 0) and up (slice 1) share the input: A [S, E, R, n, H], B [S, E, nI, R]
        # (n = 2; 1 without a gate, up alone)
        self.register_buffer("gate_up_a", zeros(e, max_rank, n, h), persistent=False)
        self.register_buffer("gate_up_b", zeros(e, n * i, max_rank), persistent=False)
        self.register_buffer("down_a", zeros(e, max_rank, i), persistent=False)  # [S, E, R, I]
        self.register_buffer("down_b", zeros(e, h, max_rank), persistent=False)  # [S, E, H, R]
        self.slot_ranks = [0] * max_loras  # the real rank per slot; 0 = no weights here
        # the last group's plan: add_gate_up makes it, add_down of the same group reuses it
        self._planned: tuple[ExpertGroup, tuple[list, tuple | None]] | None = None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
                ) -> torch.Tensor:
        meta = get_context().lora_meta
        if meta is None or not any(self.slot_ranks[s] for s in meta.active_slot_list):
            return self.base_layer(x, weights, experts)
        slots = meta.token_lora_indices[:x.shape[0]]
        return self.base_layer(x, weights, experts, slots, len(self.slot_ranks), lora=self)

    def _plan(self, group: ExpertGroup) -> tuple[list, tuple | None]:
        """The group's adapter runs: long ones (rank, rows, slot) each get plain matmuls;
        the rows of all short ones (a decode step's one or two tokens per adapter) go
        together into one batched matmul with each row's own slot: (rows, slots, the
        largest rank), or None. Made once per group (both projections use it)."""
        if self._planned is not None and self._planned[0] is group:
            return self._planned[1]
        long, rows, slots, rank = [], [], [], 0
        for slot, start, end in group.slot_runs:
            r = self.slot_ranks[slot] if slot >= 0 else 0
            if not r:
                continue
            lo, hi = start - group.start, end - group.start
            if hi - lo >= _LONG_RUN:
                long.append((r, slice(lo, hi), slot))
            else:
                rows.extend(range(lo, hi))
                slots.extend([slot] * (hi - lo))
                rank = max(rank, r)
        short = None
        if rows:
            device = self.gate_up_a.device
            short = (torch.tensor(rows, device=device), torch.tensor(slots, device=device),
                     rank)
        self._planned = group, (long, short)
        return long, short

    def add_gate_up(self, h: torch.Tensor, x: torch.Tensor, group: ExpertGroup) -> None:
        """h[:, :I] += B1 A1 x, h[:, I:] += B3 A3 x, each row with its slot's weights (fp32
        products, one rounding into h, as lora/ops)."""
        e, i, n = group.expert, self.intermediate_size, len(self.projections)
        long, short = self._plan(group)
        x = x.float()
        for r, rows, s in long:
            a, b = self.gate_up_a[s, e, :r].float(), self.gate_up_b[s, e, :, :r].float()
            t = torch.einsum("nh,rkh->knr", x[rows], a)  # A1 x, A3 x: [2, n, r]
            for k in range(n):
                h[rows, k * i:(k + 1) * i] += (t[k] @ b[k * i:(k + 1) * i].T).to(h.dtype)
        if short is not None:  # the same, each row with its own slot's A and B
            rows, slots, r = short
            a = self.gate_up_a[slots, e, :r].float()  # [n, r, 2, H]
            t = torch.bmm(a.flatten(1, 2), x[rows].unsqueeze(-1)).view(len(rows), r, n)
            b = self.gate_up_b[slots, e, :, :r].float()  # [n, 2I, r]
            for k in range(n):
                cols = slice(k * i, (k + 1) * i)
                h[rows, cols] += torch.bmm(b[:, cols], t[:, :, k:k + 1]).squeeze(-1).to(h.dtype)

    def add_down(self, y: torch.Tensor, a: torch.Tensor, group: ExpertGroup) -> None:
        """y += B2 A2 a, each row with its slot's weights."""
        e = group.expert
        long, short = self._plan(group)
        a = a.float()
        for r, rows, s in long:
            delta = (a[rows] @ self.down_a[s, e, :r].float().T) @ self.down_b[s, e, :, :r].float().T
            y[rows] += delta.to(y.dtype)
        if short is not None:
            rows, slots, r = short
            t = torch.bmm(self.down_a[slots, e, :r].float(), a[rows].unsqueeze(-1))  # [n, r, 1]
            y[rows] += torch.bmm(self.down_b[slots, e, :, :r].float(), t).squeeze(-1).to(y.dtype)

    # ---- slots (LoRAManager's interface, as LinearWithLoRA's) --------------------------
    def pack(self, parts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
             pin_memory: bool = False) -> tuple[torch.Tensor, ...]:
        """One adapter's per-expert weights, {(expert, "gate" | "up" | "down"): (A [r, in],
        B [out, r])}, in the layout of one slot: (gate_up_a [E, r, 2, H], gate_up_b
        [E, 2I, r], down_a [E, r, I], down_b [E, H, r]), r = the largest rank; what is
        not targeted stays zero."""
        rank = max(a.shape[0] for a, _ in parts.values())
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        dtype, n = self.gate_up_a.dtype, len(self.projections)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin_memory)

        gate_up_a, gate_up_b = zeros(e, rank, n, h), zeros(e, n * i, rank)
        down_a, down_b = zeros(e, rank, i), zeros(e, h, rank)
        for (expert, proj), (a, b) in parts.items():
            r = a.shape[0]
            if proj == "down":
                down_a[expert, :r], down_b[expert, :, :r] = a, b
            else:
                k = self.projections.index(proj)
                gate_up_a[expert, :r, k] = a
                gate_up_b[expert, k * i:(k + 1) * i, :r] = b
        return gate_up_a, gate_up_b, down_a, down_b

    def set_packed(self, slot: int, *packed: torch.Tensor) -> None:
        """Copy pack()'s output into `slot`, and zero the ranks its last adapter used
        beyond this one's."""
        rank, old = packed[0].shape[1], self.slot_ranks[slot]
        if old > rank:
            for view in self._rank_views(slot, rank, old):
                view.zero_()
        for view, src in zip(self._rank_views(slot, 0, rank), packed, strict=True):
            view.copy_(src, non_blocking=True)
        self.slot_ranks[slot] = rank

    def reset_lora(self, slot: int) -> None:
        for view in self._rank_views(slot, 0, self.slot_ranks[slot]):
            view.zero_()  # only the first slot_ranks[slot] ranks can hold weights
        self.slot_ranks[slot] = 0

    def _rank_views(self, slot: int, lo: int, hi: int) -> list[torch.Tensor]:
        """Ranks lo:hi of the slot's four buffers (empty when lo == hi)."""
        if lo == hi:
            return []
        return [self.gate_up_a[slot, :, lo:hi], self.gate_up_b[slot, :, :, lo:hi],
                self.down_a[slot, :, lo:hi], self.down_b[slot, :, :, lo:hi]]

    def slot_bytes_per_rank(self) -> int:
        """Bytes of one slot at rank 1: every expert's A and B columns."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        n = len(self.projections)
        return e * (n * h + n * i + i + h) * self.gate_up_a.element_size()

"""LFM2's short-convolution block (HF's Lfm2ShortConv) over a flat batch.

    in_proj(x) -> B, C, x            (three slices of hidden channels each)
    y = C * conv(B * x)              conv: causal and depthwise, L_cache taps per channel
    out = out_proj(y)

No activation and no SSM: the only thing a sequence carries from step to step is the
conv's window, its last L_cache - 1 inputs (B * x) per channel. That window lives in a
state slot (worker/mamba_state.py, as a Mamba2 mixer's conv state) which this layer
reads and writes as the step context's `MambaBatch` says: a prefill chunk continues from
the window its previous chunk left (zeros for a first chunk), a decode row shifts it by
one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import MambaBatch
from loraplex.layers.quantization import QuantConfig


class ShortConv(nn.Module):
    """Under HF's module names (in_proj, conv, out_proj). `conv_state` [slots, hidden,
    L_cache - 1] is set by the state cache."""

    def __init__(self, hidden_size: int, kernel: int, bias: bool,
                 quant: QuantConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.hidden_size, self.kernel = hidden_size, kernel
        self.in_proj = make_linear(hidden_size, [3 * hidden_size], bias, quant,
                                   (f"{prefix}.in_proj",))
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel, groups=hidden_size, bias=bias)
        self.out_proj = make_linear(hidden_size, [hidden_size], bias, quant,
                                    (f"{prefix}.out_proj",))
        self.conv_state: torch.Tensor | None = None

    def slot_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """One sequence's state: the conv window only."""
        return {"conv_state": (self.hidden_size, self.kernel - 1)}

    def forward(self, x: torch.Tensor, batch: MambaBatch) -> torch.Tensor:
        b, c, h = self.in_proj(x).chunk(3, dim=-1)  # [T, hidden] each
        bx = b * h
        parts = [self._prefill(bx[s:e], slot, fresh) for s, e, slot, fresh in batch.prefill]
        if batch.decode_slots is not None and batch.decode_slots.numel():
            parts.append(self._decode(bx[batch.decode_start:], batch.decode_slots))
        conv = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self.out_proj(c * conv)

    def _prefill(self, bx: torch.Tensor, slot: int, fresh: bool) -> torch.Tensor:
        """One sequence's chunk [L, hidden] after its window (zeros when fresh); the new
        window written back unless slot is -1 (the profile run)."""
        k, keep = self.kernel - 1, slot >= 0
        prev = self.conv_state[slot].to(bx.dtype) if keep and not fresh \
            else bx.new_zeros(self.hidden_size, k)
        full = torch.cat([prev, bx.T], dim=-1)  # [hidden, k + L]
        out = F.conv1d(full[None], self.conv.weight, self.conv.bias,
                       groups=self.hidden_size)[0].T  # [L, hidden]
        if keep:
            self.conv_state[slot] = full[:, -k:]
        return out

    def _decode(self, bx: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One row per sequence [D, hidden]: the window shifted by it, one conv step."""
        full = torch.cat([self.conv_state[slots].to(bx.dtype), bx[:, :, None]], -1)
        out = (full * self.conv.weight[:, 0]).sum(-1)  # [D, hidden]
        if self.conv.bias is not None:
            out = out + self.conv.bias
        self.conv_state[slots] = full[:, :, 1:].to(self.conv_state.dtype)
        return out

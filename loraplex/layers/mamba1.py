"""The Mamba-1 mixer (selective scan, S6; HF's MambaMixer, FalconMambaMixer and
JambaMambaMixer) over a flat batch.

    in_proj(x) -> u, z
    u -> causal depthwise conv1d (its last d_conv - 1 inputs are the conv state) -> silu
    x_proj(u) -> dt, B, C    (FalconMamba, Jamba: each RMS-normalized; FalconMamba's
                              without a weight, Jamba's with one)
    dt = softplus(dt_proj(dt))                          [T, d_inner]
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  A = -exp(A_log)   [d_inner, d_state]
    y_t = (C_t . h_t + D u_t) * silu(z_t) -> out_proj

Unlike Mamba2, A and dt are per channel, not per head, so the state is [d_inner, d_state]
per sequence. Each sequence carries its conv and SSM states from step to step in state
slots (worker/mamba_state.py), read and written as the step's `MambaBatch` says: a
prefill chunk scans from the state its previous chunk left (zeros for a first chunk), a
decode row takes one step of the recurrence. x_proj and dt_proj run once over the whole
flat batch, so their LoRA sees every row with its own adapter slot. Plain torch, fp32
inside; no mamba_ssm / causal_conv1d kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import ConvSSMState, MambaBatch
from loraplex.layers.norm import RMSNorm
from loraplex.layers.quantization import QuantConfig


@dataclass(frozen=True)
class Mamba1Args:
    intermediate_size: int  # d_inner: expand x hidden
    state_size: int  # d_state
    conv_kernel: int  # d_conv
    time_step_rank: int  # dt_rank: x_proj's dt part, dt_proj's input
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj's and out_proj's
    # RMS norms on dt, B and C after x_proj: "" none (Mamba), "plain" without a weight
    # (FalconMamba), "weighted" (Jamba: dt_layernorm, b_layernorm, c_layernorm)
    bcdt_norm: str = ""
    norm_eps: float = 1e-6
    scan_chunk: int = 64  # prefill rows scanned at once (memory: chunk x d_inner x d_state)

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """One sequence's conv state [d_inner, d_conv - 1] and SSM state [d_inner,
        d_state]."""
        return ((self.intermediate_size, self.conv_kernel - 1),
                (self.intermediate_size, self.state_size))


def selective_scan(u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   c: torch.Tensor, h0: torch.Tensor, chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's scan, fp32: u, dt [L, I], a [I, N], b / c [L, N], h0 [I, N].
    Returns y [L, I] = C_t . h_t (without D's skip) and the last state [I, N].

    `chunk` rows at a time; within a chunk the recurrence h_t = da_t h_{t-1} + db_t is an
    inclusive scan of the pairs (da, db) under (a1, b1) then (a2, b2) = (a1 a2, a2 b1 +
    b2), done by doubling (log2(chunk) steps, each over the whole chunk): exact, only
    summed in another order than one step at a time."""
    ys = []
    h = h0
    for start in range(0, u.shape[0], chunk):
        end = start + chunk
        da = torch.exp(dt[start:end, :, None] * a)  # [l, I, N]
        db = (dt[start:end] * u[start:end])[:, :, None] * b[start:end, None, :]
        db = torch.cat([db[:1] + da[:1] * h, db[1:]])  # the chunk's start state folded in
        step = 1
        while step < db.shape[0]:
            db = torch.cat([db[:step], db[step:] + da[step:] * db[:-step]])
            da = torch.cat([da[:step], da[step:] * da[:-step]])
            step *= 2
        ys.append(torch.einsum("lin,ln->li", db, c[start:end]))
        h = db[-1]
    return torch.cat(ys), h


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """FalconMamba's weightless RMS norm, in fp32, cast back."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Mamba1Mixer(ConvSSMState, nn.Module):
    """A Mamba-1 layer under HF's module names (in_proj, conv1d, x_proj, dt_proj, A_log,
    D, out_proj; Jamba's dt_layernorm, b_layernorm, c_layernorm). `conv_state` [slots,
    d_inner, d_conv - 1] and `ssm_state` [slots, d_inner, d_state] are set by the state
    cache (worker/mamba_state.py)."""

    def __init__(self, hidden_size: int, m: Mamba1Args, quant: QuantConfig | None = None,
                 prefix: str = "") -> None:
        """`quant`: a quantized checkpoint's, for the four projections (`prefix`: the
        mixer's module name, which modules_to_not_convert may name them under)."""
        super().__init__()
        self.m = m
        inner, n, rank = m.intermediate_size, m.state_size, m.time_step_rank

        def linear(name: str, inputs: int, outputs: int, bias: bool) -> nn.Module:
            return make_linear(inputs, [outputs], bias, quant, (f"{prefix}.{name}",))
        # one module each in HF (and for PEFT): one LoRA A over u and z together
        self.in_proj = linear("in_proj", hidden_size, 2 * inner, m.proj_bias)
        self.conv1d = nn.Conv1d(inner, inner, m.conv_kernel, groups=inner, bias=m.conv_bias)
        self.x_proj = linear("x_proj", inner, rank + 2 * n, False)
        self.dt_proj = linear("dt_proj", rank, inner, True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = linear("out_proj", inner, hidden_size, m.proj_bias)
        if m.bcdt_norm == "weighted":
            self.dt_layernorm = RMSNorm(rank, m.norm_eps)
            self.b_layernorm = RMSNorm(n, m.norm_eps)
            self.c_layernorm = RMSNorm(n, m.norm_eps)
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: MambaBatch) -> torch.Tensor:
        m = self.m
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [T, d_inner] each
        decoding = batch.decode_slots is not None and batch.decode_slots.numel() > 0
        d = batch.decode_start
        parts = [self._conv_prefill(u[s:e], slot, fresh) for s, e, slot, fresh in batch.prefill]
        if decoding:
            parts.append(self._conv_decode(u[d:], batch.decode_slots))
        u = F.silu(torch.cat(parts) if len(parts) > 1 else parts[0])
        dt, b, c = self.x_proj(u).split([m.time_step_rank, m.state_size, m.state_size], -1)
        dt, b, c = self._norm_bcdt(dt, b, c)
        dt = F.softplus(self.dt_proj(dt).float())  # [T, d_inner]
        uf, b, c = u.float(), b.float(), c.float()
        a = -torch.exp(self.A_log.float())
        parts = [self._scan_prefill(uf[s:e], dt[s:e], a, b[s:e], c[s:e], slot, fresh)
                 for s, e, slot, fresh in batch.prefill]
        if decoding:
            parts.append(self._scan_decode(uf[d:], dt[d:], a, b[d:], c[d:],
                                           batch.decode_slots))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        y = (y + self.D.float() * uf) * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))

    def _norm_bcdt(self, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FalconMamba's and Jamba's norms of dt (before dt_proj), B and C."""
        if self.m.bcdt_norm == "weighted":
            return self.dt_layernorm(dt), self.b_layernorm(b), self.c_layernorm(c)
        if self.m.bcdt_norm == "plain":
            eps = self.m.norm_eps
            return _rms(dt, eps), _rms(b, eps), _rms(c, eps)
        return dt, b, c

    def _conv_prefill(self, u: torch.Tensor, slot: int, fresh: bool) -> torch.Tensor:
        """One sequence's chunk [L, d_inner] after its conv state (zeros when fresh); the
        new state written back unless slot is -1 (the profile run)."""
        k, keep = self.m.conv_kernel - 1, slot >= 0
        prev = self.conv_state[slot].to(u.dtype) if keep and not fresh \
            else u.new_zeros(u.shape[1], k)
        full = torch.cat([prev, u.T], dim=-1)  # [d_inner, k + L]
        if keep:
            self.conv_state[slot] = full[:, -k:]
        return F.conv1d(full[None], self.conv1d.weight, self.conv1d.bias,
                        groups=u.shape[1])[0].T

    def _conv_decode(self, u: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One row per sequence [D, d_inner]: the window shifted by it, one conv step."""
        full = torch.cat([self.conv_state[slots].to(u.dtype), u[:, :, None]], -1)
        self.conv_state[slots] = full[:, :, 1:].to(self.conv_state.dtype)
        out = (full * self.conv1d.weight[:, 0]).sum(-1)
        return out + self.conv1d.bias if self.conv1d.bias is not None else out

    def _scan_prefill(self, u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, c: torch.Tensor, slot: int, fresh: bool) -> torch.Tensor:
        keep = slot >= 0
        h0 = self.ssm_state[slot].float() if keep and not fresh else a.new_zeros(a.shape)
        y, h = selective_scan(u, dt, a, b, c, h0, self.m.scan_chunk)
        if keep:
            self.ssm_state[slot] = h.to(self.ssm_state.dtype)
        return y

    def _scan_decode(self, u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, c: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence per row [D, ...]."""
        h = self.ssm_state[slots].float() * torch.exp(dt[..., None] * a) \
            + (dt * u)[..., None] * b[:, None, :]  # [D, d_inner, d_state]
        self.ssm_state[slots] = h.to(self.ssm_state.dtype)
        return (h @ c[..., None])[..., 0]

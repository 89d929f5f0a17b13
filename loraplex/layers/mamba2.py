"""The Mamba2 mixer (HF's GraniteMoeHybridMambaLayer / Mamba2Mixer) over a flat batch.

    in_proj(x) -> z, xBC, dt
    xBC -> causal depthwise conv1d (its last d_conv - 1 inputs are the conv state) -> silu
        -> x, B, C
    SSD selective scan: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,  y_t = C_t h_t + D x_t,
        dt = softplus(dt + dt_bias), A = -exp(A_log)
    grouped RMSNorm of y gated by silu(z) -> out_proj

Each sequence carries its own conv and SSM states from step to step, in state slots
(worker/mamba_state.py) that this layer reads and writes as the step context says
(`StepContext.mamba`): a prefill chunk runs the chunked scan of HF's torch_forward from
the state its previous chunk left (zeros for a first chunk), a decode row one step of
the recurrence, dt clamped to time_step_limit in both (HF clamps it in its prefill only:
the two differ where dt falls outside the limit, as Zamba2's lower one of time_step_min
allows). Plain torch, fp32 inside; no mamba_ssm / causal_conv1d kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import make_linear
from loraplex.layers.quantization import QuantConfig


@dataclass(frozen=True)
class Mamba2Args:
    num_heads: int
    head_dim: int
    state_size: int  # d_state
    n_groups: int
    conv_kernel: int  # d_conv
    intermediate_size: int  # num_heads x head_dim
    chunk_size: int
    conv_bias: bool = True
    proj_bias: bool = False
    eps: float = 1e-6
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    norm_before_gate: bool = False  # Granite: False (y * silu(z), then the norm)
    gated_norm: bool = True  # False: no norm, y * silu(z) (Falcon-H1 without mamba_rms_norm)
    out_proj_bias: bool | None = None  # out_proj's bias where not proj_bias's (Falcon-H1)
    # Falcon-H1's muP: the input times in_multiplier, in_proj's output (z, x, B, C, dt)
    # times one multiplier per part
    in_multiplier: float = 1.0
    zxbcdt_multipliers: tuple[float, float, float, float, float] | None = None

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    def zxbcdt_scale(self) -> torch.Tensor | None:
        """in_proj's output multipliers per channel (Falcon-H1's mup_vector); None: 1."""
        if self.zxbcdt_multipliers is None:
            return None
        gn = self.n_groups * self.state_size
        sizes = (self.intermediate_size, self.intermediate_size, gn, gn, self.num_heads)
        return torch.cat([torch.full((n,), float(v)) for n, v in
                          zip(sizes, self.zxbcdt_multipliers, strict=True)])

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """One sequence's conv state [conv_dim, d_conv - 1] and SSM state [heads, head_dim,
        d_state]."""
        return ((self.conv_dim, self.conv_kernel - 1),
                (self.num_heads, self.head_dim, self.state_size))


@dataclass
class MambaBatch:
    """Where each sequence's rows of the step are and which state slot they use.
    `prefill`: (first row, end row, slot, fresh) per prompt chunk, fresh = its first chunk
    (the state starts at zeros); slot -1 = no state kept (the profile run). `decode_start`:
    the first decode row; `decode_slots`: [D] long, one slot per decode row."""
    prefill: list[tuple[int, int, int, bool]]
    decode_start: int = 0
    decode_slots: torch.Tensor | None = None


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above."""
    n = a.shape[-1]
    x = a[..., None].expand(*a.shape, n)
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~causal, -torch.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             c: torch.Tensor, h0: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD scan of one sequence, fp32 (HF's mamba2_chunk_scan, batch of one).
    x [L, H, P], dt [L, H] (after softplus), a [H], b / c [L, H, N], h0 [H, P, N].
    Returns y [L, H, P] (without D's skip) and the final state [H, P, N]."""
    n = x.shape[0]
    pad = (chunk - n % chunk) % chunk

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [L, ...] -> [K, chunk, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))
        return t.reshape(-1, chunk, *t.shape[1:])

    xs = chunks(x * dt[..., None])  # [K, l, H, P]
    da = chunks(a * dt).permute(2, 0, 1)  # [H, K, l]
    bs, cs = chunks(b), chunks(c)  # [K, l, H, N]
    cum = torch.cumsum(da, dim=-1)  # [H, K, l]
    # within each chunk: attention-like weights C_l . B_s, decayed from s to l
    decay = torch.exp(segment_sum(da))  # [H, K, l, s]
    scores = torch.einsum("klhn,kshn->klsh", cs, bs) * decay.permute(1, 2, 3, 0)
    y_diag = torch.einsum("klsh,kshp->klhp", scores, xs)
    # each chunk's own contribution to the state at its end
    to_end = torch.exp(cum[..., -1:] - cum)  # [H, K, l]
    states = torch.einsum("klhn,klhp->khpn", bs * to_end.permute(1, 2, 0)[..., None], xs)
    # the states at the chunk boundaries, from h0 on
    states = torch.cat([h0[None].to(states.dtype), states])  # [K + 1, H, P, N]
    across = torch.exp(segment_sum(F.pad(cum[..., -1], (1, 0))))  # [H, K + 1, K + 1]
    states = torch.einsum("hzk,khpn->zhpn", across, states)
    starts, final = states[:-1], states[-1]
    # what each chunk's start state gives its rows
    y_off = torch.einsum("klhn,khpn->klhp", cs, starts) * torch.exp(cum).permute(1, 2, 0)[
        ..., None]
    y = (y_diag + y_off).reshape(-1, *x.shape[1:])[:n]
    return y, final


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of the channels, gated by silu(z): before the norm (Granite's,
    norm_before_gate False) or after it."""

    def __init__(self, size: int, groups: int, eps: float, norm_before_gate: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y, gate = y.float(), F.silu(z.float())
        if not self.norm_before_gate:
            y = y * gate
        g = y.view(*y.shape[:-1], self.groups, -1)
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).view(y.shape)
        if self.norm_before_gate:
            y = y * gate
        return self.weight * y.to(dtype)


class ConvSSMState:
    """A layer whose per-sequence state is a conv state and an SSM state of the shapes its
    args give (`m.state_shapes()`: Mamba2's and Mamba-1's mixers, gated DeltaNets), which
    the state cache (worker/mamba_state.py) sets as `conv_state` / `ssm_state`."""

    m: Any

    def slot_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """One sequence's states, by the attribute the state cache sets."""
        conv, ssm = self.m.state_shapes()
        return {"conv_state": conv, "ssm_state": ssm}


class Mamba2Mixer(ConvSSMState, nn.Module):
    """A Mamba2 layer under HF's module names (in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj). `conv_state` [slots, conv_dim, d_conv - 1] and `ssm_state` [slots, heads,
    head_dim, d_state] are set by the state cache (worker/mamba_state.py)."""

    def __init__(self, hidden_size: int, m: Mamba2Args, quant: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.m = m
        self.in_proj = make_linear(hidden_size, [m.intermediate_size + m.conv_dim + m.num_heads],
                                   m.proj_bias, quant, (f"{prefix}.in_proj",))
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.conv_kernel, groups=m.conv_dim,
                                bias=m.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(m.num_heads))
        self.A_log = nn.Parameter(torch.empty(m.num_heads))
        self.D = nn.Parameter(torch.empty(m.num_heads))
        self.norm = GatedRMSNorm(m.intermediate_size, m.n_groups, m.eps, m.norm_before_gate) \
            if m.gated_norm else None
        self.out_proj = make_linear(m.intermediate_size, [hidden_size],
                                    m.proj_bias if m.out_proj_bias is None else m.out_proj_bias,
                                    quant, (f"{prefix}.out_proj",))
        scale = m.zxbcdt_scale()
        self.register_buffer("zxbcdt_scale", scale, persistent=False)
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: MambaBatch) -> torch.Tensor:
        m = self.m
        proj = self.in_proj(x * m.in_multiplier if m.in_multiplier != 1.0 else x)
        if self.zxbcdt_scale is not None:
            proj = proj * self.zxbcdt_scale.to(proj.dtype)
        z, xbc, dt = proj.split([m.intermediate_size, m.conv_dim, m.num_heads], -1)
        parts = [self._prefill(xbc[s:e], dt[s:e], slot, fresh)
                 for s, e, slot, fresh in batch.prefill]
        if batch.decode_slots is not None and batch.decode_slots.numel():
            d = batch.decode_start
            parts.append(self._decode(xbc[d:], dt[d:], batch.decode_slots))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0]  # [conv_dim, d_conv]

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [T, conv_dim] -> x [T, H, P], B and C [T, H, N] (groups repeated over
        their heads), fp32."""
        m = self.m
        xs, b, c = xbc.float().split([m.intermediate_size, m.n_groups * m.state_size,
                                      m.n_groups * m.state_size], -1)
        rep = m.num_heads // m.n_groups
        b = b.view(-1, m.n_groups, m.state_size).repeat_interleave(rep, dim=1)
        c = c.view(-1, m.n_groups, m.state_size).repeat_interleave(rep, dim=1)
        return xs.view(-1, m.num_heads, m.head_dim), b, c

    def _prefill(self, xbc: torch.Tensor, dt: torch.Tensor, slot: int,
                 fresh: bool) -> torch.Tensor:
        """One sequence's chunk of rows [L, ...], from its state (zeros when fresh); its
        state after them written back unless slot is -1."""
        m, keep = self.m, slot >= 0
        k = m.conv_kernel - 1
        prev = (self.conv_state[slot] if keep and not fresh
                else xbc.new_zeros(m.conv_dim, k))
        full = torch.cat([prev.to(xbc.dtype), xbc.T], dim=-1)  # [C, k + L]
        conv = F.conv1d(full[None], self.conv1d.weight, self.conv1d.bias,
                        groups=m.conv_dim)[0].T  # [L, C]
        xs, b, c = self._split(F.silu(conv))
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*m.time_step_limit)
        a = -torch.exp(self.A_log.float())
        h0 = (self.ssm_state[slot].float() if keep and not fresh
              else xs.new_zeros(m.num_heads, m.head_dim, m.state_size))
        y, h = ssd_scan(xs, dt, a, b, c, h0, m.chunk_size)
        if keep:
            self.conv_state[slot] = full[:, -k:]
            self.ssm_state[slot] = h.to(self.ssm_state.dtype)
        y = y + self.D.float()[:, None] * xs
        return y.reshape(y.shape[0], -1)

    def _decode(self, xbc: torch.Tensor, dt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One row per sequence [D, ...]: one step of the conv and of the recurrence."""
        full = torch.cat([self.conv_state[slots].to(xbc.dtype), xbc[:, :, None]], -1)
        conv = (full * self._conv_weight()).sum(-1)  # [D, C]
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        self.conv_state[slots] = full[:, :, 1:]
        xs, b, c = self._split(F.silu(conv))
        # clamped as in a prefill (HF's and mamba_ssm's decode step does not), so a token's
        # state is the same whether it was decoded or recomputed in a prefill (preemption)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.m.time_step_limit)
        da = torch.exp(dt * -torch.exp(self.A_log.float()))
        h = self.ssm_state[slots].float() * da[..., None, None] \
            + (dt[..., None] * xs)[..., None] * b[:, :, None, :]  # [D, H, P, N]
        self.ssm_state[slots] = h.to(self.ssm_state.dtype)
        y = (h @ c[..., None])[..., 0] + self.D.float()[:, None] * xs
        return y.reshape(y.shape[0], -1)

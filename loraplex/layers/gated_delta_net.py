"""The gated DeltaNet layer (Yang et al., 2025) of Qwen3-Next and Qwen3.5 over a flat batch.

    in_proj(x) -> q, k, v (the conv's input), z (the output gate), b, a
    q, k, v -> causal depthwise conv1d (its last d_conv - 1 inputs are the conv state)
        -> silu; q and k L2-normed per head, q times d_k^-1/2
    the gated delta rule, per value head, S a [d_k, d_v] state:
        S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - S'_{t-1} k_t))^T,  o_t = S_t^T q_t
        S' = exp(g_t) S_{t-1},  g = -exp(A_log) softplus(a + dt_bias),  beta = sigmoid(b)
    RMSNorm of each head's o (its weight), times silu(z) -> out_proj

Qwen3-Next's checkpoints fuse the projections as in_proj_qkvz and in_proj_ba, grouped by
key head (each group's q, k, then its value heads' v and z; its b, then its a); Qwen3.5's
split them (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), q, k, v each whole. A key head
serves num_v_heads / num_k_heads consecutive value heads.

Each sequence's conv and S states live in the state slots mamba uses
(worker/mamba_state.py, `StepContext.mamba`): a prefill chunk runs the chunked form
(transformers' torch_chunk_gated_delta_rule: within a chunk the delta rule's updates as
one triangular solve, across chunks the state carried) from the state its previous chunk
left (zeros when fresh), a decode row one step of the recurrence. Plain torch, fp32
inside; no fla / causal_conv1d kernels.

The rule takes its decay g per channel of the key too ([.., H, d_k], Kimi Delta Attention:
layers/kda.py) where Qwen's is one per head ([.., H, 1]): `DeltaRuleMixer` is what both
layers share (the conv over [q, k, v], the states, the rule), each its own projections,
gates and norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import ConvSSMState, MambaBatch
from loraplex.layers.quantization import QuantConfig


@dataclass(frozen=True)
class GatedDeltaNetArgs:
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float
    fused_projections: bool  # Qwen3-Next's in_proj_qkvz / in_proj_ba (else Qwen3.5's four)
    chunk_size: int = 64  # the chunked form's (HF's default)

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def state_shapes(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        """One sequence's conv state [conv_dim, d_conv - 1] and delta-rule state [v heads,
        d_k, d_v]."""
        return ((self.conv_dim, self.conv_kernel - 1),
                (self.num_v_heads, self.head_k_dim, self.head_v_dim))


def l2_normed(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dim (fla's and HF's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _decayed_products(a: torch.Tensor, b: torch.Tensor, cum: torch.Tensor,
                      upper: torch.Tensor) -> torch.Tensor:
    """[H, K, C, C]: sum_d a_id b_jd exp(cum_i - cum_j) (cum's channel d, or its one value
    per head) for j <= i, 0 above. a, b [H, K, C, D], cum [H, K, C, Dg]. A gate per head is
    one matmul times the decay; a gate per channel goes chunk by chunk, so the decays
    [H, C, C, D] exist one chunk at a time."""
    if cum.shape[-1] == 1:
        cum = cum[..., 0]
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, -torch.inf).exp()
        return (a @ b.transpose(-1, -2)) * decay
    out = []
    for i in range(cum.shape[1]):
        c = cum[:, i]  # [H, C, D]
        decay = (c[:, :, None] - c[:, None]).masked_fill(upper[..., None], -torch.inf).exp()
        out.append(torch.einsum("hid,hjd,hijd->hij", a[:, i], b[:, i], decay))
    return torch.stack(out, 1)


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, s0: torch.Tensor, chunk: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, fp32: q, k [L, H, Dk] (normed and scaled), v [L, H, Dv], g [L, H] or
    [L, H, Dg] (the log decay: one per head, or Dk, one per key channel), beta [L, H], s0
    [H, Dk, Dv]. Returns o [L, H, Dv] and the final state [H, Dk, Dv].
    Within a chunk, T = (I + strictly-lower((beta k) k^T * decay))^-1 turns its updates
    into u = T (beta v) and w = T (beta k exp(cum g)); across chunks the state is carried."""
    n = q.shape[0]
    pad = (chunk - n % chunk) % chunk
    g = g[..., None] if g.dim() == 2 else g

    def chunks(t: torch.Tensor) -> torch.Tensor:  # [L, H, ...] -> [H, K, C, ...]
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, 0, 0, pad))
        return t.reshape(-1, chunk, *t.shape[1:]).movedim(2, 0)

    q, k, v = chunks(q), chunks(k), chunks(v)  # [H, K, C, D]
    g, beta = chunks(g), chunks(beta[..., None])  # [H, K, C, Dg], [.., 1]
    cum = g.cumsum(-2)  # [H, K, C, Dg]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    kb = k * beta
    system = _decayed_products(kb, k, cum, upper)  # (its diagonal is taken as 1)
    u = torch.linalg.solve_triangular(system, v * beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, kb * cum.exp(), upper=False,
                                      unitriangular=True)
    within = _decayed_products(q, k, cum, upper)  # [H, K, C, C]
    q_decayed = q * cum.exp()
    k_to_end = k * (cum[..., -1:, :] - cum).exp()
    chunk_decay = cum[..., -1, :].exp()[..., None]  # [H, K, Dg, 1]
    state, out = s0, []
    for i in range(q.shape[1]):
        v_new = u[:, i] - w[:, i] @ state  # the part the state does not predict
        out.append(q_decayed[:, i] @ state + within[:, i] @ v_new)
        state = state * chunk_decay[:, i] + k_to_end[:, i].transpose(-1, -2) @ v_new
    o = torch.stack(out, 1).flatten(1, 2)[:, :n]  # [H, L, Dv]
    return o.transpose(0, 1), state


def recurrent_gated_delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               g: torch.Tensor, beta: torch.Tensor, s: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of D sequences, fp32: q, k [D, H, Dk], v [D, H, Dv], g [D, H] or
    [D, H, Dg] (as the chunked form's), beta [D, H], s [D, H, Dk, Dv]. Returns o [D, H,
    Dv] and the new states."""
    g = g[..., None] if g.dim() == 2 else g
    s = s * g.exp()[..., None]
    predicted = (s * k[..., None]).sum(-2)  # S^T k: [D, H, Dv]
    s = s + k[..., None] * ((v - predicted) * beta[..., None])[..., None, :]
    return (s * q[..., None]).sum(-2), s


class DeltaRuleMixer(ConvSSMState, nn.Module):
    """What a gated DeltaNet and Kimi Delta Attention share over the flat batch: the
    depthwise conv over [q, k, v] (`conv_weight`) from each sequence's conv state, then the
    gated delta rule from its state, both written back (`delta_rule`). `conv_state`
    [slots, conv_dim, d_conv - 1] and `ssm_state` [slots, v heads, d_k, d_v] are set by
    the state cache (worker/mamba_state.py)."""

    m: GatedDeltaNetArgs
    conv_state: torch.Tensor | None
    ssm_state: torch.Tensor | None

    def conv_weight(self) -> torch.Tensor:
        """The depthwise conv's weight [conv_dim, 1, d_conv] over [q, k, v]."""
        raise NotImplementedError

    def delta_rule(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   batch: MambaBatch) -> torch.Tensor:
        """qkv [T, conv_dim] (the conv's input), g [T, Hv] or [T, Hv, Dg] and beta [T, Hv]
        fp32 -> o [T, Hv, Dv] fp32, each sequence's rows from its state."""
        parts = [self._prefill(qkv[s:e], g[s:e], beta[s:e], slot, fresh)
                 for s, e, slot, fresh in batch.prefill]
        if batch.decode_slots is not None and batch.decode_slots.numel():
            d = batch.decode_start
            parts.append(self._decode(qkv[d:], g[d:], beta[d:], batch.decode_slots))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _heads(self, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv's silu output [T, conv_dim] -> q, k [T, Hv, Dk] (each key head repeated
        over its value heads, L2-normed, q scaled) and v [T, Hv, Dv], fp32."""
        m = self.m
        q, k, v = F.silu(conv.float()).split([m.key_dim, m.key_dim, m.value_dim], -1)
        r = m.num_v_heads // m.num_k_heads
        q = l2_normed(q.view(-1, m.num_k_heads, m.head_k_dim)).repeat_interleave(r, 1)
        k = l2_normed(k.view(-1, m.num_k_heads, m.head_k_dim)).repeat_interleave(r, 1)
        return q * m.head_k_dim ** -0.5, k, v.view(-1, m.num_v_heads, m.head_v_dim)

    def _prefill(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, slot: int,
                 fresh: bool) -> torch.Tensor:
        """One sequence's chunk of rows, from its state (zeros when fresh); its state after
        them written back unless slot is -1 (the profile run)."""
        m, keep = self.m, slot >= 0
        kept = m.conv_kernel - 1
        prev = (self.conv_state[slot] if keep and not fresh
                else qkv.new_zeros(m.conv_dim, kept))
        full = torch.cat([prev.to(qkv.dtype), qkv.T], dim=-1)  # [C, d_conv - 1 + L]
        conv = F.conv1d(full[None], self.conv_weight(), groups=m.conv_dim)[0].T  # [L, C]
        q, k, v = self._heads(conv)
        s0 = (self.ssm_state[slot].float() if keep and not fresh
              else q.new_zeros(m.state_shapes()[1]))
        o, s = chunk_gated_delta_rule(q, k, v, g, beta, s0, m.chunk_size)
        if keep:
            self.conv_state[slot] = full[:, -kept:]
            self.ssm_state[slot] = s.to(self.ssm_state.dtype)
        return o

    def _decode(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        """One row per sequence: one step of the conv and of the recurrence."""
        full = torch.cat([self.conv_state[slots].to(qkv.dtype), qkv[:, :, None]], -1)
        conv = (full * self.conv_weight()[:, 0]).sum(-1)  # [D, C]
        self.conv_state[slots] = full[:, :, 1:]
        q, k, v = self._heads(conv)
        o, s = recurrent_gated_delta_step(q, k, v, g, beta, self.ssm_state[slots].float())
        self.ssm_state[slots] = s.to(self.ssm_state.dtype)
        return o


class GatedDeltaNet(DeltaRuleMixer):
    """A gated DeltaNet layer under HF's module names (linear_attn.*): one decay per value
    head, silu(z) gating the norm."""

    def __init__(self, hidden_size: int, m: GatedDeltaNetArgs, quant: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.m = m
        if m.fused_projections:
            self.in_proj_qkvz = make_linear(hidden_size, [m.conv_dim + m.value_dim], False,
                                            quant, (f"{prefix}.in_proj_qkvz",))
            self.in_proj_ba = make_linear(hidden_size, [2 * m.num_v_heads], False, quant,
                                          (f"{prefix}.in_proj_ba",))
        else:
            self.in_proj_qkv = make_linear(hidden_size, [m.conv_dim], False, quant,
                                           (f"{prefix}.in_proj_qkv",))
            self.in_proj_z = make_linear(hidden_size, [m.value_dim], False, quant,
                                         (f"{prefix}.in_proj_z",))
            self.in_proj_b = make_linear(hidden_size, [m.num_v_heads], False, quant,
                                         (f"{prefix}.in_proj_b",))
            self.in_proj_a = make_linear(hidden_size, [m.num_v_heads], False, quant,
                                         (f"{prefix}.in_proj_a",))
        self.conv1d = nn.Conv1d(m.conv_dim, m.conv_dim, m.conv_kernel, groups=m.conv_dim,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(m.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(m.num_v_heads))
        self.norm = HeadGatedRMSNorm(m.head_v_dim, m.eps)
        self.out_proj = make_linear(m.value_dim, [hidden_size], False, quant,
                                    (f"{prefix}.out_proj",))
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, hidden] -> the conv's input [T, conv_dim] (q, k, v each whole), z [T, Hv,
        Dv], b and a [T, Hv]."""
        m, t = self.m, x.shape[0]
        if not m.fused_projections:
            return (self.in_proj_qkv(x), self.in_proj_z(x).view(t, m.num_v_heads, -1),
                    self.in_proj_b(x), self.in_proj_a(x))
        r = m.num_v_heads // m.num_k_heads  # value heads per key head
        qkvz = self.in_proj_qkvz(x).view(t, m.num_k_heads, -1)
        q, k, v, z = qkvz.split([m.head_k_dim, m.head_k_dim, r * m.head_v_dim,
                                 r * m.head_v_dim], -1)
        b, a = self.in_proj_ba(x).view(t, m.num_k_heads, 2 * r).split([r, r], -1)
        qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], -1)
        return (qkv, z.reshape(t, m.num_v_heads, m.head_v_dim), b.reshape(t, -1),
                a.reshape(t, -1))

    def conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight

    def forward(self, x: torch.Tensor, batch: MambaBatch) -> torch.Tensor:
        m = self.m
        qkv, z, b, a = self._project(x)
        beta = torch.sigmoid(b.float())
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        o = self.delta_rule(qkv, g, beta, batch)  # [T, Hv, Dv] fp32
        y = self.norm(o.to(x.dtype), z)
        return self.out_proj(y.reshape(x.shape[0], m.value_dim))


class HeadGatedRMSNorm(nn.Module):
    """Each head's output RMS-normed, then times gate(z) in fp32: HF's Qwen3NextRMSNormGated
    (the weight applied in the input's dtype, silu) or, `kimi`, KimiLinearRMSNormGated (the
    weight applied in fp32, sigmoid)."""

    def __init__(self, size: int, eps: float, kimi: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.kimi = eps, kimi

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = o.dtype
        y = o.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kimi:
            return (self.weight.float() * y * torch.sigmoid(z.float())).to(dtype)
        y = self.weight * y.to(dtype)
        return (y * F.silu(z.float())).to(dtype)

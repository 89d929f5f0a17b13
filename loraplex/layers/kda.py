"""Kimi Delta Attention (KDA: Kimi-Linear's linear attention layers) over a flat batch, as
HF's KimiLinearDeltaAttention computes it:

    q, k, v = q_proj(x), k_proj(x), v_proj(x) -> each its causal depthwise conv1d
        (q_conv1d, k_conv1d, v_conv1d; one conv over [q, k, v] here) -> silu;
        q and k L2-normed per head, q times d^-1/2
    g    = -exp(A_log_h) softplus(f_b_proj(f_a_proj(x)) + dt_bias)   per head and channel
    beta = sigmoid(b_proj(x))                                        per head
    the gated delta rule, S a [d, d] state per head, decayed per key channel:
        S_t = diag(exp(g_t)) S_{t-1} + k_t (beta_t (v_t - S'_{t-1} k_t))^T,  o_t = S_t^T q_t
    RMSNorm of each head's o (o_norm, in fp32), times sigmoid(g_b_proj(g_a_proj(x))) -> o_proj

It is the gated DeltaNet of layers/gated_delta_net.py with the decay per channel instead
of per head, as many key as value heads, separate projections, a low-rank output gate and
a sigmoid one: the conv, the states and the rule (chunked for a prefill chunk, one
recurrence step per decode row) are that file's `DeltaRuleMixer`. The forget gate's
parameters (f_a_proj, f_b_proj, dt_bias, A_log) sit on the layer, as the hub's remote code
and checkpoints hold them (transformers 5 groups them under `forget_gate`: its names are
read as these, models/kimi_linear.py). The projections take the checkpoint's quantization
(make_linear); the convs, A_log and dt_bias stay plain, as every quantizer leaves them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.gated_delta_net import DeltaRuleMixer, GatedDeltaNetArgs, HeadGatedRMSNorm
from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import MambaBatch
from loraplex.layers.quantization import QuantConfig


class KimiDeltaAttention(DeltaRuleMixer):
    """A KDA layer under HF's module names (self_attn.*); `m`: its heads as key and value
    heads alike (num_k_heads = num_v_heads, head_k_dim = head_v_dim)."""

    def __init__(self, hidden_size: int, m: GatedDeltaNetArgs, quant: QuantConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.m = m
        size, kernel = m.key_dim, m.conv_kernel
        shapes = {"q_proj": (hidden_size, size), "k_proj": (hidden_size, size),
                  "v_proj": (hidden_size, size), "f_a_proj": (hidden_size, m.head_k_dim),
                  "f_b_proj": (m.head_k_dim, m.key_dim), "b_proj": (hidden_size, m.num_v_heads),
                  "g_a_proj": (hidden_size, m.head_v_dim),
                  "g_b_proj": (m.head_v_dim, m.value_dim), "o_proj": (m.value_dim, hidden_size)}
        for name, (fan_in, fan_out) in shapes.items():
            setattr(self, name, make_linear(fan_in, [fan_out], False, quant,
                                            (f"{prefix}.{name}",)))
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            setattr(self, name, nn.Conv1d(size, size, kernel, groups=size, bias=False))
        # fp32 whatever the model's dtype, as HF keeps it (_keep_in_fp32_modules_strict)
        self.dt_bias = nn.Parameter(torch.zeros(m.key_dim, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(1, 1, m.num_k_heads, 1))
        self.o_norm = HeadGatedRMSNorm(m.head_v_dim, m.eps, kimi=True)
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """The forget gate, g = -exp(A_log_h) softplus(f_b_proj(f_a_proj(x)) + dt_bias)
        [T, H, d] in fp32: a decay per head and key channel through a rank-d bottleneck."""
        m = self.m
        g = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias
        g = g.view(-1, m.num_k_heads, m.head_k_dim)
        return -self.A_log.float()[0].exp() * F.softplus(g)

    def conv_weight(self) -> torch.Tensor:
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])

    def forward(self, x: torch.Tensor, batch: MambaBatch) -> torch.Tensor:
        m, t = self.m, x.shape[0]
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        beta = torch.sigmoid(self.b_proj(x).float())
        o = self.delta_rule(qkv, self.decay(x), beta, batch)  # [T, H, d] fp32
        gate = self.g_b_proj(self.g_a_proj(x)).view(t, m.num_v_heads, m.head_v_dim)
        y = self.o_norm(o.to(x.dtype), gate)
        return self.o_proj(y.reshape(t, m.value_dim))

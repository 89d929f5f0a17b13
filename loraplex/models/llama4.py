"""Llama 4's differences from the Llama decoder (models/llama.py takes them through
`LlamaArgs.llama4`; the Scout / Maverick checkpoints, Llama4ForConditionalGeneration,
are served on text by models/text_only.py).

- Rope layers attend locally, within chunks of `attention_chunk_size` tokens: a query at
  position p sees keys k <= p with k // C == p // C (layers/attention.py's `chunk`).
  Their q and k are rotated pairwise (HF's complex form: rope_interleaved) and then,
  with use_qk_norm, RMS-normalized per head without a weight (`l2_norm`).
- NoPE layers (no_rope_layers[i] == 0) attend globally without positions; with
  attn_temperature_tuning their queries are scaled by
  log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1 (`query_scale`), so attention
  stays sharp far into a long context.
- The feed-forward sublayer is `feed_forward`: in moe_layers a mixture (`Llama4MoE`),
  elsewhere a dense SwiGLU MLP of intermediate_size_mlp. The router picks the top-k
  (Scout, Maverick: k = 1) experts by logit; the chosen expert gets the token's input
  times sigmoid(logit) (the input, not the output, is weighted); a shared expert is
  added ungated. HF stores the experts fused, [E, H, 2I] (gate's columns, then up's)
  and [E, I, H] (layers/experts.py `llama4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.experts import FusedExperts
from loraplex.layers.moe import GateLinear
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.quantized_experts import BnB4bitFusedExperts


@dataclass(frozen=True)
class Llama4Args:
    chunk_size: int  # attention_chunk_size (0: none)
    chunked_layers: tuple[int, ...]  # layer_types "chunked_attention"
    moe_layers: tuple[int, ...]
    num_experts: int  # num_local_experts (each MoE layer's)
    intermediate_size_mlp: int  # the dense layers' MLP (the experts': intermediate_size)
    qk_norm: bool  # use_qk_norm: weightless RMS norm of q and k on the rope layers
    temperature_tuning: bool  # attn_temperature_tuning on the NoPE layers
    floor_scale: float
    attn_scale: float

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """The NoPE layers' query scale at each position [T] (fp32), as HF computes it."""
        floor = torch.floor((positions.float() + 1.0) / self.floor_scale)
        return torch.log1p(floor) * self.attn_scale + 1.0


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama4TextL2Norm: x / rms(x) over the last dimension, in fp32, no weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Llama4MoE(nn.Module):
    """Top-k routing by logit, sigmoid(logit) weighting the chosen experts' input, and
    a shared expert (`shared`: the model's gated MLP). `quant`: bitsandbytes 4-bit, the
    experts NF4-quantized as they load (the router stays plain)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, shared: nn.Module, quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = GateLinear(hidden_size, num_experts)
        if quant is None:
            self.experts = FusedExperts(hidden_size, intermediate_size, num_experts,
                                        llama4=True)
        else:  # Llama 4's layout and routing on the 4-bit experts
            self.experts = BnB4bitFusedExperts(hidden_size, intermediate_size, num_experts,
                                               quant)
            self.experts.fused_transposed = self.experts.scale_inputs = True
            self.experts.peft_in_out = True
        self.shared_expert = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # [T, E]
        top, experts = logits.topk(self.top_k, dim=-1)  # [T, k]
        weights = torch.sigmoid(top.float()).to(x.dtype)
        return self.shared_expert(x) + self.experts(x, weights, experts)


def llama4_flags(hf: Any) -> dict[str, Any]:
    """LlamaArgs flags of a Llama4TextConfig (models/registry.py)."""
    layers = hf.num_hidden_layers
    nope = tuple(i for i, rope in enumerate(hf.no_rope_layers) if not rope)
    types = getattr(hf, "layer_types", None) or [
        "full_attention" if i in nope else "chunked_attention" for i in range(layers)]
    chunk = int(getattr(hf, "attention_chunk_size", None) or 0)
    moe = getattr(hf, "moe_layers", None)
    if moe is None:
        step = int(hf.interleave_moe_layer_step)
        moe = range(step - 1, layers, step)
    bias = bool(getattr(hf, "attention_bias", False))
    floor_scale = float(hf.floor_scale)
    if not floor_scale > 0 or not math.isfinite(floor_scale):
        raise ValueError(f"Llama 4: floor_scale={hf.floor_scale} must be positive")
    return dict(
        nope_layers=nope, qkv_bias=bias, o_bias=bias,
        num_experts_per_tok=int(hf.num_experts_per_tok),
        llama4=Llama4Args(
            chunk_size=chunk,
            chunked_layers=tuple(i for i, t in enumerate(types)
                                 if t == "chunked_attention") if chunk else (),
            moe_layers=tuple(int(i) for i in moe),
            num_experts=int(hf.num_local_experts),
            intermediate_size_mlp=int(hf.intermediate_size_mlp),
            qk_norm=bool(hf.use_qk_norm),
            temperature_tuning=bool(hf.attn_temperature_tuning),
            floor_scale=floor_scale, attn_scale=float(hf.attn_scale)))

"""Falcon-H1 (FalconH1ForCausalLM): each layer runs attention and a Mamba2 mixer side by
side on one normed input, then a SwiGLU MLP, with muP multipliers throughout:

    h = norm(x)
    x = x + mamba(h * ssm_in) * ssm_out + attn(h * attn_in) * attn_out
    x = x + down(up(h') * silu(gate(h') * gate_m)) * down_m,   h' = pre_ff_layernorm(x)

The mixer's in_proj output is scaled per part (z, x, B, C, dt: ssm_multipliers, HF's
mup_vector) and its gated norm is optional (mamba_rms_norm; without it y * silu(z));
the keys are scaled by key_multiplier, the embeddings by embedding_multiplier and the
logits by lm_head_multiplier (LlamaArgs' embedding_multiplier, logit_scale). Every
multiplier applies after its projection's LoRA, as PEFT on HF's model has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.activation import ACTIVATIONS
from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import Mamba2Mixer
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.worker.context import get_context

FALCON_H1 = "FalconH1ForCausalLM"
# its checkpoints' names -> ours (Bamba's: models/mamba_hybrid.py)
FALCON_H1_RENAMES = ((".pre_ff_layernorm.", ".post_attention_layernorm."),
                     ("model.final_layernorm.", "model.norm."))


class FalconH1MLP(nn.Module):
    """down(up(x) * act(gate(x) * gate_multiplier)) * down_multiplier."""

    def __init__(self, a: Any, prefix: str, multipliers: tuple[float, float]) -> None:
        super().__init__()
        size = a.intermediate_size
        self.gate_up_proj = make_linear(a.hidden_size, [size] * 2, a.mlp_bias, a.quant,
                                        (f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.down_proj = make_linear(size, [a.hidden_size], a.mlp_bias, a.quant,
                                     (f"{prefix}.down_proj",))
        self.act = ACTIVATIONS[a.hidden_act]
        self.gate_multiplier, self.down_multiplier = multipliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate * self.gate_multiplier)) \
            * self.down_multiplier


class FalconH1DecoderLayer(nn.Module):
    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        from loraplex.models.llama import LlamaAttention  # (llama.py builds this layer)
        f = a.falcon_h1
        self.input_layernorm = a.norm(a.hidden_size)
        self.post_attention_layernorm = a.norm(a.hidden_size)
        self.mamba = Mamba2Mixer(a.hidden_size, a.mamba, a.quant, f"{prefix}.mamba")
        self.self_attn = LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        self.feed_forward = FalconH1MLP(a, f"{prefix}.feed_forward", f.mlp_multipliers)
        self.ssm_out, self.attn_in, self.attn_out = (f.ssm_out_multiplier,
                                                     f.attention_in_multiplier,
                                                     f.attention_out_multiplier)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.mamba(h, get_context().mamba) * self.ssm_out \
            + self.self_attn(positions, h * self.attn_in) * self.attn_out
        return x + self.feed_forward(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class FalconH1Args:
    """The layers' multipliers (HF's defaults: 1)."""

    mlp_multipliers: tuple[float, float] = (1.0, 1.0)  # the gate's, the down projection's
    ssm_out_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0

    @classmethod
    def from_hf(cls, hf: Any) -> FalconH1Args:
        gate, down = hf.mlp_multipliers or (1.0, 1.0)
        return cls((float(gate), float(down)), float(hf.ssm_out_multiplier),
                   float(hf.attention_in_multiplier), float(hf.attention_out_multiplier))


def falcon_h1_flags(hf: Any) -> dict[str, Any]:
    """LlamaArgs flags of a Falcon-H1 config (its mixers' shape: mamba_hybrid.py)."""
    every = tuple(range(int(hf.num_hidden_layers)))
    return dict(hybrid_layer="falcon_h1", falcon_h1=FalconH1Args.from_hf(hf),
                mamba_layers=every, mixer_attention_layers=every,
                checkpoint_renames=FALCON_H1_RENAMES,
                key_multiplier=float(hf.key_multiplier),
                embedding_multiplier=float(hf.embedding_multiplier),
                logit_scale=float(hf.lm_head_multiplier))

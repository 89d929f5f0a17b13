"""Zamba2 (Zamba2ForCausalLM): Mamba2 layers, some of them (hybrid_layer_ids) preceded by a
transformer block whose weights are shared between layers:

    mamba layer:  x = x + mamba(norm(x))
    hybrid layer: t = linear(block(x, e)),  x = x + mamba(norm(x + t))
    block(x, e):  h = attn(input_layernorm([x, e])),  mlp(pre_ff_layernorm(h))

e is the token embeddings (the model's input), so the block attends over 2 x hidden
channels (head_dim = 2 x hidden / heads, scores scaled by (head_dim / 2)^-1/2). There are
num_mem_blocks distinct blocks; the i-th hybrid layer runs block i % num_mem_blocks, with
its own small low-rank "adapters" (base weights, not LoRA) on q / k / v (when
use_shared_attention_adapter) and on the MLP's fused gate_up_proj.

As HF's model, each hybrid layer holds its own block module (`shared_transformer`) whose
parameters are the first one's of the same block id (tied here, so loaded and kept once),
and its own attention KV cache (each invocation attends over its own inputs). PEFT wraps
each layer's q_proj / ... separately, so a LoRA adapter has weights per hybrid layer, which
the LoRA manager serves per layer as for any module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraplex.layers.activation import ACT_AND_MUL
from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.mamba2 import Mamba2Args, Mamba2Mixer
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.worker.context import get_context

ZAMBA2 = "Zamba2ForCausalLM"


@dataclass(frozen=True)
class Zamba2Args:
    hybrid_layers: tuple[int, ...]  # the layers with a block before their mixer
    num_mem_blocks: int
    adapter_rank: int
    attention_adapters: bool  # use_shared_attention_adapter
    rope: bool  # use_mem_rope

    def block_id(self, hybrid_index: int) -> int:
        return hybrid_index % self.num_mem_blocks

    def adapter_list(self, hybrid_index: int, size_in: int, size_out: int) -> nn.ModuleList:
        """HF's per-invocation adapter list of the block that hybrid layer `hybrid_index`
        runs: rank adapter_rank for the invocations of that block, Identity elsewhere."""
        block = self.block_id(hybrid_index)
        return nn.ModuleList(
            nn.Sequential(nn.Linear(size_in, self.adapter_rank, bias=False),
                          nn.Linear(self.adapter_rank, size_out, bias=False))
            if self.block_id(i) == block else nn.Identity()
            for i in range(len(self.hybrid_layers)))


class Zamba2Attention(nn.Module):
    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, hybrid_index: int
                 ) -> None:
        super().__init__()
        z, width = a.zamba2, 2 * a.hidden_size
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.head_dim, self.hybrid_index = a.head_dim, hybrid_index
        self.qkv_proj = make_linear(width, [self.q_size, self.kv_size, self.kv_size], False,
                                    a.quant, tuple(f"{prefix}.{p}_proj" for p in "qkv"))
        self.o_proj = make_linear(self.q_size, [a.hidden_size], False, a.quant,
                                  (f"{prefix}.o_proj",))
        if z.attention_adapters:
            for p in "qkv":
                setattr(self, f"linear_{p}_adapter_list", z.adapter_list(hybrid_index, width,
                                                                         width))
        self.adapters = z.attention_adapters
        self.rotary = rotary if z.rope else None
        self.attn = Attention(a.num_heads, a.num_kv_heads, a.head_dim,
                              (a.head_dim / 2) ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.adapters:
            i = self.hybrid_index
            q = q + self.linear_q_adapter_list[i](x)
            k = k + self.linear_k_adapter_list[i](x)
            v = v + self.linear_v_adapter_list[i](x)
        q = q.view(x.shape[0], -1, self.head_dim)  # [T, H, D]
        k = k.view(x.shape[0], -1, self.head_dim)
        v = v.view(x.shape[0], -1, self.head_dim)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Zamba2MLP(nn.Module):
    """down(act(gate) * up), gate and up the halves of the fused gate_up_proj plus this
    invocation's adapter."""

    def __init__(self, a: Any, prefix: str, hybrid_index: int) -> None:
        super().__init__()
        size = a.intermediate_size
        self.gate_up_proj = make_linear(a.hidden_size, [2 * size], False, a.quant,
                                        (f"{prefix}.gate_up_proj",))
        self.down_proj = make_linear(size, [a.hidden_size], False, a.quant,
                                     (f"{prefix}.down_proj",))
        self.gate_up_proj_adapter_list = a.zamba2.adapter_list(hybrid_index, a.hidden_size,
                                                               2 * size)
        self.act_and_mul = ACT_AND_MUL[a.hidden_act]
        self.hybrid_index = hybrid_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x) + self.gate_up_proj_adapter_list[self.hybrid_index](x)
        return self.down_proj(self.act_and_mul(gate_up))


class Zamba2Block(nn.Module):
    """The shared transformer block (HF's Zamba2AttentionDecoderLayer), no residual."""

    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, hybrid_index: int
                 ) -> None:
        super().__init__()
        self.input_layernorm = a.norm(2 * a.hidden_size)
        self.self_attn = Zamba2Attention(a, rotary, f"{prefix}.self_attn", hybrid_index)
        self.pre_ff_layernorm = a.norm(a.hidden_size)
        self.feed_forward = Zamba2MLP(a, f"{prefix}.feed_forward", hybrid_index)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, embeds: torch.Tensor
                ) -> torch.Tensor:
        h = self.self_attn(positions, self.input_layernorm(torch.cat([x, embeds], dim=-1)))
        return self.feed_forward(self.pre_ff_layernorm(h))


class Zamba2MambaLayer(nn.Module):
    """x + mamba(norm(x + t)), t the hybrid layer's block output (none: 0)."""

    def __init__(self, a: Any, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = a.norm(a.hidden_size)
        self.mamba = Mamba2Mixer(a.hidden_size, a.mamba, a.quant, f"{prefix}.mamba")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, embeds: torch.Tensor,
                t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input_layernorm(x if t is None else x + t)
        return x + self.mamba(h, get_context().mamba)


class Zamba2HybridLayer(nn.Module):
    def __init__(self, a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        hybrid_index = a.zamba2.hybrid_layers.index(index)
        self.shared_transformer = Zamba2Block(a, rotary, f"{prefix}.shared_transformer",
                                              hybrid_index)
        self.linear = make_linear(a.hidden_size, [a.hidden_size], False, a.quant,
                                  (f"{prefix}.linear",))
        self.mamba_decoder = Zamba2MambaLayer(a, f"{prefix}.mamba_decoder")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, embeds: torch.Tensor
                ) -> torch.Tensor:
        t = self.linear(self.shared_transformer(positions, x, embeds))
        return self.mamba_decoder(positions, x, embeds, t)


def zamba2_layer(a: Any, rotary: RotaryEmbedding, prefix: str, index: int) -> nn.Module:
    """Layer `index`: a hybrid one or a mixer alone (LlamaModel's layer class)."""
    if index in a.zamba2.hybrid_layers:
        return Zamba2HybridLayer(a, rotary, prefix, index)
    return Zamba2MambaLayer(a, prefix)


def tie_shared_blocks(layers: nn.ModuleList, z: Zamba2Args) -> None:
    """Each hybrid layer's block takes the parameters of the first block of its id (HF's
    tied weights: the checkpoint holds them once)."""
    first: dict[int, nn.Module] = {}
    for hybrid_index, index in enumerate(z.hybrid_layers):
        block = layers[index].shared_transformer
        source = first.setdefault(z.block_id(hybrid_index), block)
        if source is block:
            continue
        for name, _ in list(block.named_parameters()):
            path, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(path), leaf,
                    getattr(source.get_submodule(path), leaf))


def zamba2_flags(hf: Any) -> dict[str, Any]:
    """LlamaArgs flags of a Zamba2 config: every layer a mixer, some with a block; the
    mixers' shape (conv bias always, eps 1e-5, dt clamped below at time_step_min during a
    prefill, as HF's); the MLP's fused gate_up_proj."""
    kinds = list(hf.layers_block_type)
    unknown = sorted({k for k in kinds if k not in ("hybrid", "mamba", "linear_attention")})
    if unknown:
        raise ValueError(f"{ZAMBA2}: layer types {unknown} are not supported")
    hybrid = tuple(i for i, k in enumerate(kinds) if k == "hybrid")
    if hybrid and int(hf.num_key_value_heads) != int(hf.num_attention_heads):
        raise ValueError(f"{ZAMBA2}: num_key_value_heads must equal num_attention_heads")
    inner = int(hf.mamba_expand * hf.hidden_size)
    heads = int(hf.n_mamba_heads)
    mamba = Mamba2Args(num_heads=heads, head_dim=inner // heads,
                       state_size=int(hf.mamba_d_state), n_groups=int(hf.mamba_ngroups),
                       conv_kernel=int(hf.mamba_d_conv), intermediate_size=inner,
                       chunk_size=int(hf.chunk_size), conv_bias=True,
                       proj_bias=bool(hf.add_bias_linear), eps=1e-5,
                       time_step_limit=(float(hf.time_step_min), float("inf")))
    z = Zamba2Args(hybrid, int(hf.num_mem_blocks), int(hf.adapter_rank),
                   bool(hf.use_shared_attention_adapter), bool(hf.use_mem_rope))
    return dict(hybrid_layer="zamba2", zamba2=z, mamba=mamba,
                mamba_layers=tuple(range(len(kinds))), mixer_attention_layers=hybrid,
                fused_gate_up=True, checkpoint_renames=(("model.final_layernorm.",
                                                         "model.norm."),))

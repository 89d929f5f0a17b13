"""Llama-family decoder (Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma,
Gemma 2, Gemma 3 (text), Phi-3, Granite, OLMo 2, gpt-oss, Nemotron, StarCoder2, Cohere and
the others of models/registry.py) over a flat batch of tokens.

One file, flags for the differences:
- Qwen2 has a bias on q/k/v; Qwen3 RMS-normalizes q and k per head, OLMo 2 over all heads
  at once.
- Gemma scales the embeddings by sqrt(hidden), uses GeGLU and its own RMSNorm (1 + w, in
  fp32). Gemma 2 adds a norm after each sublayer too ("sandwich"), scales attention by
  query_pre_attn_scalar^-1/2 and caps attention scores and final logits with
  cap * tanh(x / cap). Gemma 3 normalizes q and k per head and rotates its local
  (sliding-window) layers with a base of their own.
- OLMo 2 has norms only after the sublayers ("post").
- Granite scales the embeddings, each sublayer's output, the attention scores and the
  logits by constants of its config.
- Mixtral's, the Qwen MoE models', GLM-4.5's and gpt-oss's MLP is a sparse mixture of
  experts (layers/moe.py; gpt-oss's router and experts have biases, its experts a clamped
  SwiGLU; GLM-4.5 routes by grouped sigmoid scores and adds ungated shared experts).
- gpt-oss has biases on q/k/v and o, and attention sinks: a learned logit per head that
  joins the softmax (layers/attention.py).
- Phi-3's checkpoints (and adapters) hold q/k/v and gate/up already fused as qkv_proj and
  gate_up_proj.
- Some layers attend within a sliding window (Mistral v0.1, Phi-3, Gemma 2 and 3).
- Nemotron, Arcee and StarCoder2 have an MLP without a gate: down(act(up(x))), with
  squared ReLU (Nemotron, Arcee) or GELU (StarCoder2, whose projections are c_fc, c_proj).
- StarCoder2, Nemotron and Cohere normalize with LayerNorm (StarCoder2's and Nemotron's
  with a bias; Nemotron stores its weight as w - 1).
- Cohere runs attention and the MLP side by side on one normed input ("parallel"), and
  scales its logits by logit_scale; so do Phi-1.5 / Phi-2 (fc1 / fc2, their attention
  output `dense`, lm_head with a bias) and StableLM's parallel-residual configs. GPT-NeoX
  runs them side by side each on its own norm ("parallel_two_norms"), its q/k/v fused
  per head (qkv_per_head).
- Apertus's ungated MLP has xIELU, learned per layer; OLMo 1 normalizes without
  parameters and clamps q/k/v (clip_qkv); Phi-3.5-MoE routes its experts by sparsemixer.
- Llama 4 (`llama4`, models/llama4.py): chunked local attention on its rope layers, q/k
  L2-normed there, temperature-tuned queries on its NoPE layers, and a `feed_forward`
  that is a sigmoid-routed mixture with a shared expert (Llama4MoE) or a dense MLP.
- Ministral 3 (`position_query_scale`): queries scaled by 1 + beta ln(1 + floor(p / n))
  at position p (Llama 4's scaling past the original context n), in every layer.
- Gemma 4 (`gemma4`) runs a decoder of its own, models/gemma4.py (`decoder_class`):
  per-layer attention shapes, KV sharing, per-layer embeddings, experts beside the MLP.
- DeepSeek-V2 / V3 attend with multi-head latent attention (layers/mla.py; `mla`), and
  route their experts by grouped softmax (V2) or sigmoid (V3) scores with ungated shared
  experts (models/deepseek.py reads their configs).
- Qwen3-Next's and Qwen3.5's attention gates its output per channel (`attn_output_gate`:
  q_proj gives each head's query, then its gate; o_proj(attn * sigmoid(gate))); their
  other layers are gated DeltaNets (models/qwen3_next.py).
- Kimi-Linear's layers are KDA (layers/kda.py) or MLA without positions, with DeepSeek-V3's
  experts (models/kimi_linear.py).

Tokens of all sequences in a step are laid out flat ([T, hidden]); attention finds each
sequence's tokens through the step context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from loraplex.layers.activation import ACT_AND_MUL, ACTIVATIONS, XIELU, ClampedSwiGLU
from loraplex.layers.attention import Attention
from loraplex.layers.gated_delta_net import GatedDeltaNetArgs
from loraplex.layers.linear import make_linear
from loraplex.layers.mamba1 import Mamba1Args
from loraplex.layers.mamba2 import Mamba2Args
from loraplex.layers.mla import MLAArgs, MLAAttention
from loraplex.layers.moe import GroupedTopK, SparseMoE
from loraplex.layers.norm import FP32ScaleRMSNorm, GemmaRMSNorm, LayerNorm, RMSNorm
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.falcon_h1 import FalconH1Args
from loraplex.models.llama4 import Llama4Args, Llama4MoE, l2_norm
from loraplex.models.nemotron_h_moe import NemotronMoEArgs
from loraplex.models.text_only import TextOnly
from loraplex.models.zamba2 import Zamba2Args, tie_shared_blocks

if TYPE_CHECKING:  # (models/lfm2.py and gemma4_args.py build on this file)
    from loraplex.models.gemma3n_args import Gemma3nArgs
    from loraplex.models.gemma4_args import Gemma4Args
    from loraplex.models.lfm2 import Lfm2Args

# rows of the flat batch [N], their embeddings [N, D]; Qwen3-VL's [N, 1 + L, D]: each
# row's input embedding, then its DeepStack features for the first L layers' outputs
ImageRows = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False  # a bias on o_proj too (gpt-oss)
    mlp_bias: bool = False  # biases on the MLP's projections (Llama's mlp_bias, Seed-OSS)
    attention_sinks: bool = False  # a sink logit per head (gpt-oss)
    qk_norm: bool = False  # q and k RMS-normalized per head (Qwen3)
    qk_norm_full: bool = False  # ... over all heads' dimensions at once (OLMo 2)
    qk_norm_after_rope: bool = False  # q/k normalized after the rotation (Hunyuan)
    # each head normed with its own LayerNorm weight (Cohere, StableLM 2 12B)
    qk_norm_per_head_weight: bool = False
    # checkpoint name pieces -> ours, for architectures that name a module otherwise
    # (Hunyuan's query_layernorm is our q_norm)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # the prefix of the checkpoint's decoder tensors, prepended to names without it
    # (BLOOM's checkpoints saved from BloomModel: word_embeddings.*, h.*), before the renames
    checkpoint_prefix: str = ""
    # an HF module (in checkpoints and adapters) -> ours, which it is the whole of (Phi's
    # attention output `dense` is our o_proj)
    module_renames: tuple[tuple[str, str], ...] = ()
    # checkpoint tensors (name endings, after the renames) that are no weights: skipped
    # quietly (GPT-NeoX's causal-mask buffers, attention.bias / masked_bias)
    checkpoint_skips: tuple[str, ...] = ()
    # checkpoint modules, one per row of one of our weights (name piece -> ours): StableLM's
    # q_layernorm.norms.{head} -> the rows of our per-head q_norm.weight
    checkpoint_stacks: tuple[tuple[str, str], ...] = ()
    lm_head_bias: bool = False  # lm_head has a bias (Phi)
    clip_qkv: float | None = None  # q, k and v clamped to [-c, c] after their projection
    # (OLMo)
    quant: QuantConfig | None = None  # quantized weights in the decoder's linears
    hidden_act: str = "silu"  # the gated MLP's: silu | gelu_tanh | gelu (layers/activation.py)
    gemma: bool = False  # embeddings x sqrt(hidden), GemmaRMSNorm
    # where a layer's norms are: "pre" (on each sublayer's input), "sandwich" (Gemma 2:
    # on its input and its output), "post" (OLMo 2: on its output only), "glm" (GLM-4:
    # sandwich, under its own names), "parallel" (Cohere: one norm, both sublayers on it),
    # "parallel_two_norms" (GPT-NeoX: both sublayers on x, each through its own norm),
    # "post_ln" (OPT-350m: each norm on the residual sum, which the next sublayer reads)
    norm_layout: str = "pre"
    final_norm: bool = True  # a norm after the last layer (OPT-350m has none)
    # OPT-350m: token embeddings (and lm_head's input) this wide, its project_in after
    # them and project_out before lm_head; None: hidden_size
    word_embed_proj_dim: int | None = None
    query_pre_attn_scalar: float | None = None  # attention scale^-2 (None: head_dim)
    attn_logit_softcap: float = 0.0  # > 0: scores capped (Gemma 2)
    final_logit_softcap: float = 0.0  # > 0: logits capped (Gemma 2)
    # the HF modules are fused ones: qkv_proj (Phi-3), gate_up_proj (Phi-3, GLM)
    fused_qkv: bool = False
    # ... laid out per KV head, [kv_heads, (its queries, k, v), head_dim] (GPT-NeoX's
    # query_key_value, one query each; Falcon's new_decoder_architecture, a group each)
    qkv_per_head: bool = False
    # ... or in this many groups of (queries, keys, values) heads, in qkv_group_order
    # (CodeGen's qkv_proj: its 4 model-parallel shards', each q, v, k); 0: one per KV head
    qkv_groups: int = 0
    qkv_group_order: str = "qkv"
    # attention's output projection's name (GPTBigCode's c_proj: its MLP's is c_proj too,
    # so no per-leaf rename could name only this one)
    attention_output: str = "o_proj"
    # learned position embeddings added to the tokens' (GPTBigCode, OPT), the row of
    # position p at p + this offset (OPT's 2); None: none
    learned_positions: int | None = None
    # ALiBi (BLOOM): each head's slope; its scores get slope x key position (no rotary)
    alibi_slopes: tuple[float, ...] | None = None
    # > 0 (Falcon-RW): slope x position in bfloat16 (its factors too), then times this
    alibi_bf16_scale: float = 0.0
    embedding_norm: bool = False  # a LayerNorm on the embeddings (BLOOM's), as `embed_norm`
    fused_gate_up: bool = False
    rotary_dim: int | None = None  # partial rotary: dims of each head rotated (None: all)
    rope_interleaved: bool = False  # rotate pairs (2i, 2i+1), not halves (Ernie 4.5)
    nope_layers: tuple[int, ...] = ()  # layers without rotary positions (SmolLM3, EXAONE 4)
    num_experts: int = 0  # > 0: a sparse mixture of experts instead of the MLP
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's (None: intermediate_size)
    norm_topk_prob: bool = True  # the top-k router weights renormalized to sum to 1
    gpt_oss_experts: ClampedSwiGLU | None = None  # gpt-oss's router, experts and activation
    moe_module: str = "block_sparse_moe"  # the checkpoint's name (Qwen MoE: "mlp")
    # the checkpoint's experts fused, experts.gate_up_proj / down_proj (Qwen3-VL-MoE)
    fused_experts: bool = False
    # an expert's gate, up and down projections in the checkpoint (Mixtral: w1, w3, w2)
    expert_leaves: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    shared_expert_name: str = "shared_expert"  # GLM-4.5's: "shared_experts", ungated
    grouped_topk: GroupedTopK | None = None  # GLM-4.5's grouped sigmoid routing
    sparsemixer_eps: float | None = None  # Phi-3.5-MoE's routing: its router_jitter_noise
    dense_layers: tuple[int, ...] = ()  # layers with a plain MLP in a MoE model
    sliding_window: int | None = None  # the attention window of window_layers
    window_layers: tuple[int, ...] = ()
    local_rope: tuple[float, dict | None] | None = None  # Gemma 3: window_layers' theta,
    # scaling (None: the model's)
    long_lora_factors: tuple[float, ...] = ()  # rope tables for long-context LoRA
    rope_rows: int | None = None  # positions the rope tables hold (None: max_position)
    mrope_section: tuple[int, ...] | None = None  # Qwen2-VL's M-RoPE (models/mrope.py)
    mrope_interleaved: bool = False  # Qwen3-VL's: the axes interleaved over frequencies
    llama4: Llama4Args | None = None  # Llama 4's attention and feed-forward (llama4.py)
    # Ministral 3's llama_4_scaling_beta and original_max_position_embeddings: every
    # layer's queries scaled by 1 + beta ln(1 + floor(p / n)) at position p
    position_query_scale: tuple[float, float] | None = None
    # a multimodal checkpoint served on text: its weights' and adapters' names
    # (models/text_only.py); None for a text checkpoint
    text_only: TextOnly | None = None
    embedding_multiplier: float = 1.0  # Granite: x = E[t] * this
    # HF scales Gemma's embeddings inside its embedding module (Gemma 3; Gemma and
    # Gemma 2 on transformers 5), so embeddings a caller gives (prompt_embeds) go in
    # unscaled (config_flags._embedding_scaling)
    embed_scale_in_embedding: bool = False
    residual_multiplier: float = 1.0  # Granite: h = x + sublayer(x) * this
    attention_multiplier: float | None = None  # Granite: the attention scale (None: 1/sqrt(d))
    logits_scaling: float = 1.0  # Granite: logits / this
    logit_scale: float = 1.0  # Cohere: logits * this
    # "rms" (RMSNorm; Gemma's with gemma), "rms_1p" (Gemma's, 1 + w, without Gemma's
    # embedding scale: Qwen3-Next), "rms_fp32_scale" (Helium's: w applied before the
    # cast), "layernorm" (with a bias), "layernorm_nobias" (Cohere), "layernorm1p"
    # (Nemotron: weight stored as w - 1, with a bias), "layernorm_noparam" (OLMo: neither
    # weight nor bias, eps 1e-5)
    norm_type: str = "rms"
    # no gate: the MLP is down(act(up(x))), its projections' HF names (up, down)
    ungated_mlp: tuple[str, str] | None = None
    # multi-head latent attention (DeepSeek-V2 / V3): it shapes the cache (the latent,
    # worker/memory.py's kv_cache_layout); head_dim is then the query / key head dim
    mla: MLAArgs | None = None
    # GraniteMoe's layers (models/granite_hybrid.py): experts + a shared MLP of this size
    # (0: none); a hybrid's (Granite 4.0) Mamba2 mixers' shape and the layers that are
    # mixers (the others attend)
    granite_moe: bool = False
    mamba: Mamba2Args | None = None
    mamba_layers: tuple[int, ...] = ()
    shared_mlp_size: int = 0
    # Bamba's, Mamba2's and Nemotron-H's layers (models/mamba_hybrid.py): "bamba", or
    # "mixer_block" with the layers whose mixer is an MLP (Nemotron-H's); their adapters'
    # module path components -> ours (backbone -> model)
    hybrid_layer: str = ""
    mlp_layers: tuple[int, ...] = ()
    # Nemotron-H's mixture-of-experts mixers (models/nemotron_h_moe.py) and their layers
    nemotron_moe: NemotronMoEArgs | None = None
    moe_mixer_layers: tuple[int, ...] = ()
    adapter_aliases: tuple[tuple[str, str], ...] = ()
    # the mixer layers that attend too: Falcon-H1's, all (models/falcon_h1.py: its keys
    # scaled by key_multiplier after k_proj); Zamba2's hybrid layers (models/zamba2.py)
    mixer_attention_layers: tuple[int, ...] = ()
    key_multiplier: float = 1.0
    falcon_h1: FalconH1Args | None = None  # its layers' other multipliers
    zamba2: Zamba2Args | None = None  # its shared blocks
    # LFM2's layers (models/lfm2.py, hybrid_layer "lfm2"): its conv layers (a state per
    # sequence, no KV cache), their shape and the MLP's width
    lfm2: Lfm2Args | None = None
    # Qwen3-Next's and Qwen3.5's gated DeltaNet layers (the layers of mamba_layers:
    # models/qwen3_next.py); their attention's output gate, q_proj's second half per head
    gated_delta_net: GatedDeltaNetArgs | None = None
    attn_output_gate: bool = False
    # Kimi-Linear's KDA layers (the layers of mamba_layers: models/kimi_linear.py; a
    # key head per value head), beside MLA's
    kda: GatedDeltaNetArgs | None = None
    # Gemma 4's per-layer shapes, KV sharing, per-layer embeddings, experts (gemma4.py,
    # gemma4_args.py)
    gemma4: Gemma4Args | None = None
    # Gemma 3n's AltUp, LAuReL, per-layer MLP widths and sparsity (gemma3n.py,
    # gemma3n_args.py; its attention and per-layer embeddings are in `gemma4`)
    gemma3n: Gemma3nArgs | None = None
    # Mamba's, FalconMamba's and Jamba's Mamba-1 mixers (the layers of mamba_layers:
    # models/mamba1.py, hybrid_layer "mamba1" or "jamba")
    mamba1: Mamba1Args | None = None

    @property
    def num_attention_layers(self) -> int:
        """The layers with a KV cache (a hybrid's mixers hold a state instead; Nemotron-H's
        MLP and MoE layers nothing)."""
        conv = len(self.lfm2.conv_layers) if self.lfm2 is not None else 0
        return self.num_layers - len(self.mamba_layers) - len(self.mlp_layers) \
            - len(self.moe_mixer_layers) + len(self.mixer_attention_layers) - conv

    @property
    def host_routed(self) -> bool:
        """A mixture of experts, whose tokens are grouped by expert on the host (no decode
        CUDA graphs): SparseMoE's, Llama 4's or Gemma 4's."""
        return self.num_experts > 0 or bool(self.llama4 and self.llama4.moe_layers) \
            or bool(self.gemma4 and self.gemma4.num_experts)

    def norm(self, shape: int | tuple[int, int]) -> nn.Module:
        """A norm of the model's kind over `shape` (a tuple: one weight per head, Cohere)."""
        if self.norm_type == "rms":
            return (GemmaRMSNorm if self.gemma else RMSNorm)(shape, self.norm_eps)
        if self.norm_type == "rms_1p":
            return GemmaRMSNorm(shape, self.norm_eps)
        if self.norm_type == "rms_fp32_scale":
            return FP32ScaleRMSNorm(shape, self.norm_eps)
        if self.norm_type == "layernorm_noparam":
            return LayerNorm(shape, 1e-5, bias=False, weight=False)
        return LayerNorm(shape, self.norm_eps, bias=self.norm_type != "layernorm_nobias",
                         weight_minus_one=self.norm_type == "layernorm1p")


def _names(prefix: str, *leaves: str) -> tuple[str, ...]:
    """The HF module names a (packed) projection holds, for modules_to_not_convert."""
    return tuple(f"{prefix}.{leaf}" for leaf in leaves)


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        self.q_size = a.num_heads * a.head_dim
        self.kv_size = a.num_kv_heads * a.head_dim
        self.head_dim = a.head_dim
        # one slice when the checkpoint's module is fused (its adapters have one A for all)
        self.output_gate = a.attn_output_gate  # q_proj: each head's query, then its gate
        sizes = [self.q_size * (2 if self.output_gate else 1), self.kv_size, self.kv_size]
        self.qkv_proj = (
            make_linear(a.hidden_size, [sum(sizes)], a.qkv_bias, a.quant,
                        _names(prefix, "qkv_proj")) if a.fused_qkv else
            make_linear(a.hidden_size, sizes, a.qkv_bias, a.quant,
                        _names(prefix, "q_proj", "k_proj", "v_proj")))
        self.output_name = a.attention_output
        setattr(self, self.output_name, make_linear(self.q_size, [a.hidden_size], a.o_bias,
                                                    a.quant, _names(prefix, self.output_name)))
        self.sinks = nn.Parameter(torch.empty(a.num_heads)) if a.attention_sinks else None
        self.qk_norm_full = a.qk_norm_full
        self.qk_norm_after_rope = a.qk_norm_after_rope
        self.q_norm = self.k_norm = None
        if a.qk_norm_full:
            self.q_norm, self.k_norm = a.norm(self.q_size), a.norm(self.kv_size)
        elif a.qk_norm and a.qk_norm_per_head_weight:  # Cohere's, StableLM's: a
            # LayerNorm weight per head [heads, head_dim], no bias
            self.q_norm = LayerNorm((a.num_heads, a.head_dim), a.norm_eps, bias=False)
            self.k_norm = LayerNorm((a.num_kv_heads, a.head_dim), a.norm_eps, bias=False)
        elif a.qk_norm:
            self.q_norm, self.k_norm = a.norm(a.head_dim), a.norm(a.head_dim)
        self.rotary = None if index in a.nope_layers else rotary
        scale = a.attention_multiplier or (a.query_pre_attn_scalar or a.head_dim) ** -0.5
        window = a.sliding_window if index in a.window_layers else None
        l4 = a.llama4  # Llama 4: q/k L2 norm after the rope, temperature on NoPE layers
        self.l2_qk_eps = a.norm_eps if l4 and l4.qk_norm and self.rotary is not None \
            else None
        self.temperature = l4 if l4 and l4.temperature_tuning and self.rotary is None \
            else None
        self.position_query_scale = a.position_query_scale
        self.key_multiplier = a.key_multiplier
        self.clip_qkv = a.clip_qkv
        self.qkv_per_head = a.qkv_per_head
        self.qkv_groups = a.qkv_groups or a.num_kv_heads
        self.values_before_keys = a.qkv_group_order == "qvk"
        chunk = l4.chunk_size if l4 and index in l4.chunked_layers else 0
        self.attn = Attention(a.num_heads, a.num_kv_heads, a.head_dim, scale,
                              a.attn_logit_softcap, window or 0, chunk=chunk,
                              alibi_slopes=a.alibi_slopes,
                              alibi_bf16_scale=a.alibi_bf16_scale)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size = self.q_size * (2 if self.output_gate else 1)
        if self.qkv_per_head:  # GPT-NeoX, Falcon: each KV head's queries, k, v side by
            # side; CodeGen: each shard's queries, values, keys
            kv = self.kv_size // self.head_dim // self.qkv_groups  # KV heads per group
            qkv = self.qkv_proj(x).view(x.shape[0], self.qkv_groups, -1, self.head_dim)
            q, k, v = qkv.split([qkv.shape[2] - 2 * kv, kv, kv], dim=2)
            if self.values_before_keys:
                k, v = v, k
            q, k, v = (t.reshape(x.shape[0], -1) for t in (q, k, v))
        else:
            q, k, v = self.qkv_proj(x).split([q_size, self.kv_size, self.kv_size], dim=-1)
        gate = None
        if self.output_gate:  # [T, H, 2D] -> query, gate
            q, gate = q.view(x.shape[0], -1, 2 * self.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(x.shape[0], -1), gate.reshape(x.shape[0], -1)
        if self.clip_qkv is not None:  # OLMo
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        if self.qk_norm_full:  # OLMo 2: over every head's dimensions together
            q, k = self.q_norm(q), self.k_norm(k)
        if self.key_multiplier != 1.0:  # Falcon-H1
            k = k * self.key_multiplier
        q = q.view(x.shape[0], -1, self.head_dim)  # [T, H, D]
        k = k.view(x.shape[0], -1, self.head_dim)  # [T, KVH, D]
        v = v.view(x.shape[0], -1, self.head_dim)
        per_head = self.q_norm is not None and not self.qk_norm_full
        if per_head and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        if per_head and self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.l2_qk_eps is not None:
            q, k = l2_norm(q, self.l2_qk_eps), l2_norm(k, self.l2_qk_eps)
        if self.temperature is not None:
            q = (q * self.temperature.query_scale(positions)[:, None, None]).to(q.dtype)
        if self.position_query_scale is not None:  # Ministral 3, as HF: after the rope
            beta, original = self.position_query_scale
            scale = 1.0 + beta * torch.log1p(torch.floor(positions.float() / original))
            q = q * scale[:, None, None].to(q.dtype)
        out = self.attn(q, k, v, self.sinks)
        return getattr(self, self.output_name)(
            out if gate is None else out * torch.sigmoid(gate))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, prefix: str, intermediate_size: int | None = None
                 ) -> None:
        super().__init__()
        size = intermediate_size or a.intermediate_size
        self.gate_up_proj = (
            make_linear(a.hidden_size, [2 * size], a.mlp_bias, a.quant,
                        _names(prefix, "gate_up_proj")) if a.fused_gate_up else
            make_linear(a.hidden_size, [size] * 2, a.mlp_bias, a.quant,
                        _names(prefix, "gate_proj", "up_proj")))
        self.down_proj = make_linear(size, [a.hidden_size], a.mlp_bias, a.quant,
                                     _names(prefix, "down_proj"))
        self.act_and_mul = ACT_AND_MUL[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class UngatedMLP(nn.Module):
    """down(act(up(x))): Nemotron's and Arcee's (up_proj, down_proj; squared ReLU),
    StarCoder2's (c_fc, c_proj; GELU), Apertus's (xIELU, its parameters in act_fn), Phi's
    (fc1, fc2; GELU). Its modules carry the checkpoint's names, which its adapters
    target."""

    def __init__(self, a: LlamaArgs, prefix: str, intermediate_size: int | None = None
                 ) -> None:
        """`intermediate_size`: None for the config's (Nemotron-H's shared experts have
        their own)."""
        super().__init__()
        self.up_name, self.down_name = a.ungated_mlp
        size = intermediate_size or a.intermediate_size
        setattr(self, self.up_name, make_linear(a.hidden_size, [size],
                                                a.mlp_bias, a.quant,
                                                _names(prefix, self.up_name)))
        setattr(self, self.down_name, make_linear(size, [a.hidden_size],
                                                  a.mlp_bias, a.quant,
                                                  _names(prefix, self.down_name)))
        # (Apertus's xIELU: learned, its parameters under the checkpoint's name act_fn)
        self.act_fn = XIELU() if a.hidden_act == "xielu" else ACTIVATIONS[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.down_name)(self.act_fn(getattr(self, self.up_name)(x)))


def _llama4_ffn(a: LlamaArgs, prefix: str, index: int) -> nn.Module:
    """Llama 4's feed_forward: a mixture with a shared expert in its moe_layers, else a
    dense MLP of intermediate_size_mlp."""
    l4, name = a.llama4, f"{prefix}.feed_forward"
    if index not in l4.moe_layers:
        return LlamaMLP(a, name, l4.intermediate_size_mlp)
    return Llama4MoE(a.hidden_size, a.intermediate_size, l4.num_experts,
                     a.num_experts_per_tok, LlamaMLP(a, f"{name}.shared_expert"), a.quant)


def feed_forward(a: LlamaArgs, prefix: str, index: int) -> tuple[str, nn.Module]:
    """A layer's feed-forward sublayer and the checkpoint's name for it: the experts in
    a MoE model's sparse layers, else an MLP (Llama 4's: models/llama4.py)."""
    sparse = a.num_experts > 0 and index not in a.dense_layers
    if a.llama4 is not None:  # Llama 4's: a mixture or an MLP, one name for both
        return "feed_forward", _llama4_ffn(a, prefix, index)
    if not sparse:
        return "mlp", UngatedMLP(a, f"{prefix}.mlp") if a.ungated_mlp \
            else LlamaMLP(a, f"{prefix}.mlp")
    shared = LlamaMLP(a, f"{prefix}.mlp.{a.shared_expert_name}",
                      a.shared_expert_intermediate_size) \
        if a.shared_expert_intermediate_size else None
    experts = f"{prefix}.{a.moe_module}.experts"
    return a.moe_module, SparseMoE(
        a.hidden_size, a.moe_intermediate_size or a.intermediate_size, a.num_experts,
        a.num_experts_per_tok, a.norm_topk_prob, shared, a.quant, a.gpt_oss_experts,
        _names(experts, *(f"{e}.{leaf}" for e in range(a.num_experts)
                          for leaf in a.expert_leaves)), a.grouped_topk,
        a.shared_expert_name, a.fused_experts, a.sparsemixer_eps)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int) -> None:
        super().__init__()
        self.self_attn = MLAAttention(a.hidden_size, a.num_heads, a.mla, a.qkv_bias, a.quant,
                                      rotary, f"{prefix}.self_attn") if a.mla else \
            LlamaAttention(a, rotary, f"{prefix}.self_attn", index)
        # the feed-forward sublayer, under the checkpoint's name for it
        self.ffn_name, ffn = feed_forward(a, prefix, index)
        setattr(self, self.ffn_name, ffn)
        self.layout = a.norm_layout
        if a.norm_layout != "post":
            self.input_layernorm = a.norm(a.hidden_size)
        if a.norm_layout != "parallel":
            self.post_attention_layernorm = a.norm(a.hidden_size)
        if a.norm_layout == "sandwich":
            self.pre_feedforward_layernorm = a.norm(a.hidden_size)
        if a.norm_layout in ("sandwich", "post"):
            self.post_feedforward_layernorm = a.norm(a.hidden_size)
        if a.norm_layout == "glm":  # its post_attention_layernorm is on the MLP's input
            self.post_self_attn_layernorm = a.norm(a.hidden_size)
            self.post_mlp_layernorm = a.norm(a.hidden_size)
        self.residual_multiplier = a.residual_multiplier

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sublayer: the MLP, or the experts."""
        return getattr(self, self.ffn_name)(x)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "sandwich":  # post_attention_layernorm: on attention's output
            h = x + self.post_attention_layernorm(
                self.self_attn(positions, self.input_layernorm(x)))
            return h + self.post_feedforward_layernorm(
                self.ffn(self.pre_feedforward_layernorm(h)))
        if self.layout == "post":
            h = x + self.post_attention_layernorm(self.self_attn(positions, x))
            return h + self.post_feedforward_layernorm(self.ffn(h))
        if self.layout == "glm":
            h = x + self.post_self_attn_layernorm(
                self.self_attn(positions, self.input_layernorm(x)))
            return h + self.post_mlp_layernorm(self.ffn(self.post_attention_layernorm(h)))
        if self.layout == "parallel":  # Cohere: both sublayers read the same normed x
            normed = self.input_layernorm(x)
            return x + self.self_attn(positions, normed) + self.ffn(normed)
        if self.layout == "post_ln":  # OPT-350m: each norm on the sum, read from there
            h = self.input_layernorm(x + self.self_attn(positions, x))
            return self.post_attention_layernorm(h + self.ffn(h))
        if self.layout == "parallel_two_norms":  # GPT-NeoX: both read x, each normed
            return x + self.self_attn(positions, self.input_layernorm(x)) \
                + self.ffn(self.post_attention_layernorm(x))
        h = x + self._residual(self.self_attn(positions, self.input_layernorm(x)))
        return h + self._residual(self.ffn(self.post_attention_layernorm(h)))

    def _residual(self, y: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as it joins the residual stream (Granite scales it)."""
        return y * self.residual_multiplier if self.residual_multiplier != 1.0 else y


class LlamaModel(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        width = a.word_embed_proj_dim or a.hidden_size
        self.embed_tokens = nn.Embedding(a.vocab_size, width)
        self.project_in = self.project_out = None  # (OPT-350m's, LoRA targets too)
        if width != a.hidden_size:
            self.project_in = make_linear(width, [a.hidden_size], False, a.quant,
                                          ("model.project_in",))
            self.project_out = make_linear(a.hidden_size, [width], False, a.quant,
                                           ("model.project_out",))
        self.embed_scale = a.hidden_size ** 0.5 if a.gemma else None
        self.embed_scale_in_embedding = a.embed_scale_in_embedding
        self.embedding_multiplier = a.embedding_multiplier
        self.position_offset = a.learned_positions
        if a.learned_positions is not None and a.long_lora_factors:
            raise ValueError("--long-lora-scaling-factors: not supported on a model with "
                             "learned absolute positions (GPTBigCode, OPT)")
        if a.learned_positions is not None:  # GPTBigCode's wpe, OPT's embed_positions
            self.embed_positions = nn.Embedding(a.max_position + a.learned_positions,
                                                a.hidden_size)
        self.embed_norm = a.norm(a.hidden_size) if a.embedding_norm else None
        self.rotary = rotary = RotaryEmbedding(a.rotary_dim or a.head_dim, a.max_position,
                                               a.rope_theta, a.rope_scaling,
                                               a.long_lora_factors, a.rope_interleaved,
                                               a.mrope_section, a.mrope_interleaved,
                                               rows=a.rope_rows)
        local = rotary
        if a.local_rope is not None and a.long_lora_factors:
            raise ValueError("--long-lora-scaling-factors: not supported on a model whose "
                             "local attention layers have a rope of their own (Gemma 3)")
        if a.local_rope is not None:  # Gemma 3's sliding-window layers
            self.rotary_local = local = RotaryEmbedding(a.rotary_dim or a.head_dim,
                                                        a.max_position, *a.local_rope,
                                                        rows=a.rope_rows)
        layer_cls = LlamaDecoderLayer
        if a.granite_moe or a.hybrid_layer:  # GraniteMoe's layers, Granite 4.0's mixers
            # among them; Bamba's, Mamba2's, Nemotron-H's (models/mamba_hybrid.py)
            from loraplex.models.mamba_hybrid import layer_class
            layer_cls = layer_class(a)
        self.layers = nn.ModuleList(
            layer_cls(a, local if i in a.window_layers else rotary,
                      f"model.layers.{i}", i) for i in range(a.num_layers))
        # Zamba2's layers read the token embeddings too, and share their blocks' weights
        self.layers_take_embeddings = a.zamba2 is not None
        if a.zamba2 is not None:
            tie_shared_blocks(self.layers, a.zamba2)
        self.norm = a.norm(a.hidden_size) if a.final_norm else nn.Identity()
        # an EAGLE-3 head reads the residual stream entering these layers (vLLM's
        # aux_hidden_state_layers): each forward then keeps them, concatenated, in
        # aux_hidden_states [T, len(aux_layers) x hidden]; None (the rule): nothing kept
        self.aux_layers: tuple[int, ...] | None = None
        self.aux_hidden_states: torch.Tensor | None = None

    def given_embeds_scale(self, dtype: torch.dtype) -> float:
        """What HF multiplies embeddings a caller gives (inputs_embeds; our
        prompt_embeds) by: Granite's embedding_multiplier; Gemma's sqrt(hidden), rounded
        to the dtype, where HF scales after its embedding module (transformers 4's Gemma
        and Gemma 2); 1 elsewhere."""
        if self.embed_scale is not None and not self.embed_scale_in_embedding:
            return float(torch.tensor(self.embed_scale, dtype=dtype))
        return self.embedding_multiplier

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # with the embedding's LoRA, if any
        if self.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype
            x = x * float(torch.tensor(self.embed_scale, dtype=x.dtype))
        elif self.embedding_multiplier != 1.0:  # Granite
            x = x * self.embedding_multiplier
        if image_rows is not None:  # LLaVA, Gemma 3: image embeddings at the placeholders'
            # rows (Gemma 3's unscaled, as HF's: its scale is on the token embeddings only)
            rows, embeds = image_rows
            if embeds.dim() == 3:  # Qwen3-VL's DeepStack (models/qwen3_vl.py)
                return self._final(self._deepstack(positions, x, rows, embeds.to(x.dtype)))
            x = x.index_copy(0, rows, embeds.to(x.dtype))
        if self.project_in is not None:  # OPT-350m, as HF: before the positions join
            x = self.project_in(x)
        if self.position_offset is not None:  # (given embeddings too, as HF's)
            x = x + self.embed_positions(positions + self.position_offset)
        if self.embed_norm is not None:  # BLOOM (given embeddings too, as HF's)
            x = self.embed_norm(x)
        if self.aux_layers is not None:
            return self._final(self._keep_aux(positions, x))
        if self.layers_take_embeddings:
            embeds = x
            for layer in self.layers:
                x = layer(positions, x, embeds)
            return self._final(x)
        for layer in self.layers:
            x = layer(positions, x)
        return self._final(x)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output as lm_head reads it: normed, then (OPT-350m) projected
        back to the embeddings' width."""
        x = self.norm(x)
        return x if self.project_out is None else self.project_out(x)

    def _keep_aux(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layers' forward, keeping the input of each of aux_layers (EAGLE-3)."""
        kept = []
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                kept.append(x)
            x = layer(positions, x)
        self.aux_hidden_states = torch.cat(kept, dim=-1)
        return x

    def _deepstack(self, positions: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                   embeds: torch.Tensor) -> torch.Tensor:
        """DeepStack (Qwen3-VL): the image rows take their input embedding (embeds[:, 0])
        and, after layer i < L, their features of the tower's i-th DeepStack layer
        (embeds[:, 1 + i]) added to the hidden state, as HF's _deepstack_process."""
        x = x.index_copy(0, rows, embeds[:, 0])
        kept = []  # (EAGLE-3: the inputs of aux_layers)
        for i, layer in enumerate(self.layers):
            if self.aux_layers is not None and i in self.aux_layers:
                kept.append(x)
            x = layer(positions, x)
            if i + 1 < embeds.shape[1]:
                x = x.index_add(0, rows, embeds[:, i + 1])
        if kept:
            self.aux_hidden_states = torch.cat(kept, dim=-1)
        return x


class LlamaForCausalLM(nn.Module):
    decoder_class: type[nn.Module] = LlamaModel  # Gemma 4's: models/gemma4.py
    # HF sub-projection name -> (our packed module, index of the sub-projection)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # the HF module names a LoRA adapter may target
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj",
                           "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head")

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        if args.num_experts:  # the experts (lora/experts.py), the router, Qwen2-MoE's
            # shared expert and its gate, Qwen3-MoE's plain MLP layers (GLM-4.5's router
            # is no Linear in HF: PEFT cannot target it)
            self.lora_target_modules = self.lora_target_modules + (
                ("experts",) if args.grouped_topk else ("experts", "gate", "shared_expert_gate"))
        for is_fused, fused, parts in (
                (args.fused_qkv, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                (args.fused_gate_up, "gate_up_proj", ("gate_proj", "up_proj"))):
            if is_fused:  # the HF module is the packed one: nothing to pack, one LoRA A
                self.packed_modules_mapping = {
                    k: v for k, v in self.packed_modules_mapping.items() if k not in parts}
                self.lora_target_modules = tuple(
                    fused if m == parts[0] else m for m in self.lora_target_modules
                    if m not in parts[1:])
        if args.ungated_mlp:  # no gate: up and down under the checkpoint's names
            self.packed_modules_mapping = {k: v for k, v in self.packed_modules_mapping.items()
                                           if k not in ("gate_proj", "up_proj")}
            renamed = dict(zip(("up_proj", "down_proj"), args.ungated_mlp, strict=True))
            self.lora_target_modules = tuple(renamed.get(m, m) for m in self.lora_target_modules
                                             if m != "gate_proj")
        if args.nemotron_moe is not None and args.nemotron_moe.latent_size is not None:
            # Nemotron-H's latent projections around its experts
            self.lora_target_modules = self.lora_target_modules + (
                "fc1_latent_proj", "fc2_latent_proj")
        if args.llama4 is not None:  # the experts (PEFT's target_parameters); not the
            # router, which PEFT cannot run a LoRA on (HF's returns a tuple)
            self.lora_target_modules = self.lora_target_modules + ("experts",)
        if args.mla:  # its own projections, none packed; q_proj or q_a_proj + q_b_proj
            self.packed_modules_mapping = {k: v for k, v in self.packed_modules_mapping.items()
                                           if k not in ("q_proj", "k_proj", "v_proj")}
            q = ("q_proj",) if args.mla.q_lora_rank is None else ("q_a_proj", "q_b_proj")
            self.lora_target_modules = (*q, "kv_a_proj_with_mqa", "kv_b_proj") + tuple(
                m for m in self.lora_target_modules if m not in ("q_proj", "k_proj", "v_proj"))
        if args.granite_moe:  # Granite 3.x MoE, Granite 4.0 (models/granite_hybrid.py)
            from loraplex.models.granite_hybrid import HYBRID_LORA_TARGETS
            self.lora_target_modules = HYBRID_LORA_TARGETS
            self.packed_modules_mapping = {k: v for k, v in self.packed_modules_mapping.items()
                                           if k in ("q_proj", "k_proj", "v_proj")}
        elif args.mamba is not None:  # Bamba, Mamba2, Nemotron-H, Falcon-H1, Zamba2: the
            # mixers' projections; Zamba2's linear after each block
            self.lora_target_modules = self.lora_target_modules + ("in_proj", "out_proj") \
                + (("linear",) if args.zamba2 is not None else ())
        elif args.gated_delta_net is not None:  # Qwen3-Next's, Qwen3.5's DeltaNets
            self.lora_target_modules = self.lora_target_modules + (
                ("in_proj_qkvz", "in_proj_ba") if args.gated_delta_net.fused_projections
                else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")) + ("out_proj",)
        if args.kda is not None:  # Kimi-Linear's KDA projections beside MLA's
            from loraplex.models.kimi_linear import KDA_LORA_TARGETS
            self.lora_target_modules = self.lora_target_modules + tuple(
                m for m in KDA_LORA_TARGETS if m not in self.lora_target_modules)
        if args.mamba1 is not None:  # the Mamba-1 mixers' projections (models/mamba1.py)
            from loraplex.models.mamba1 import mamba1_lora_targets
            self.lora_target_modules = mamba1_lora_targets(args, self.lora_target_modules)
        if args.attention_output != "o_proj":  # (GPTBigCode's c_proj: its MLP's name too)
            self.lora_target_modules = tuple(dict.fromkeys(
                args.attention_output if m == "o_proj" else m
                for m in self.lora_target_modules))
        for theirs, ours in args.module_renames:  # (Phi's dense: our o_proj)
            self.packed_modules_mapping = {**self.packed_modules_mapping, theirs: (ours, 0)}
            self.lora_target_modules = tuple(theirs if m == ours else m
                                             for m in self.lora_target_modules)
        if args.word_embed_proj_dim not in (None, args.hidden_size):  # OPT-350m's
            self.lora_target_modules = self.lora_target_modules + ("project_in", "project_out")
        if args.lfm2 is not None:  # LFM2's names: out_proj, w1 / w3 / w2, the conv's
            from loraplex.models.lfm2 import lfm2_lora_targets
            self.lora_target_modules, self.packed_modules_mapping = lfm2_lora_targets(args)
        self.model = self.decoder_class(args)
        self.lm_head = make_linear(args.word_embed_proj_dim or args.hidden_size,
                                   [args.vocab_size], args.lm_head_bias)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        """Hidden states [T, hidden]; `image_rows`: (rows, embeddings) that replace those
        rows' token embeddings (a LLaVA prompt's image placeholders)."""
        return self.model(input_ids, positions, image_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_logits(self.lm_head(hidden))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """lm_head's output as the model reports it: Granite divides it by logits_scaling,
        Cohere multiplies it by logit_scale, Gemma 2 caps it (cap * tanh(logits / cap));
        others leave it as it is."""
        if self.args.logits_scaling != 1.0:
            logits = logits / self.args.logits_scaling
        if self.args.logit_scale != 1.0:
            logits = logits * self.args.logit_scale
        cap = self.args.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

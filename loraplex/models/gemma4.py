"""Gemma 4's text decoder (`Gemma4ForCausalLM`, model_type gemma4_text; the language model
of `Gemma4ForConditionalGeneration`, served on text by models/text_only.py).

Gemma 3's sandwich layers, with these differences:
- Each layer has its own attention shape (the config's `per_layer_config`: head_dim and
  num_key_value_heads; the full-attention layers' are wider). Sliding and full layers
  rotate with their own rope; the full layers' is "proportional": the first
  partial_rotary_factor of each head's frequency pairs turn (base^(-2i / head_dim)), the
  rest do not. The attention scale is 1.0; q and k are RMS-normed per head, v too
  without a weight. With attention_k_eq_v a full layer has no v_proj: its values are
  its keys' projection, v-normed (before k's norm and rope).
- KV sharing (`kv_sharing_modes`): the last num_kv_shared_layers layers ("reuse") read
  the K/V of the last earlier layer of their type ("store") and hold no cache of their
  own: their Attention reads the storing layer's cache (`reads_kv_of`), and in the step
  itself the K/V it computed (`shared`). worker/memory.py counts only the layers with
  a cache of their own. With use_double_wide_mlp those layers' MLP is twice as wide.
- Per-layer embeddings (PLE, hidden_size_per_layer_input P > 0): every token also has
  a row of embed_tokens_per_layer [V, L * P] (x sqrt(P)), which joins the normed
  projection of its embedding (per_layer_model_projection x hidden^-1/2), x 2^-1/2,
  giving layer i a [T, P] input; after its MLP the layer adds
  norm(per_layer_projection(gelu(per_layer_input_gate(h)) * input_i)).
- Every layer ends by multiplying the residual stream by its layer_scalar.
- enable_moe_block: beside the dense MLP, routed experts on the same residual input:
  the router norms it (no weight), scales it by its `scale` / sqrt(hidden), softmaxes
  over all experts, keeps the top k renormalized, each times its per_expert_scale; the
  experts (GeGLU, layers/experts.py) read pre_feedforward_layernorm_2(h); the two
  outputs are normed apart (post_feedforward_layernorm_1 / _2) and summed.
- The final logits are capped (final_logit_softcapping) where the config says so.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.layers.activation import ACTIVATIONS
from loraplex.layers.attention import Attention
from loraplex.layers.linear import make_linear
from loraplex.layers.norm import Gemma4RMSNorm
from loraplex.layers.quantization import QuantConfig
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.gemma4_args import FULL, SLIDING, Gemma4Args
from loraplex.models.gemma_quant import GemmaPlainExperts, NamedGateLinear
from loraplex.models.llama import ImageRows, LlamaArgs, LlamaForCausalLM, LlamaMLP

# K/V of the step's storing layers, by layer type: what their reusing layers attend to
SharedKV = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _gelu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS["gelu_tanh"](gate) * up


class Gemma4Attention(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int
                 ) -> None:
        super().__init__()
        g = a.gemma4
        self.layer_type = g.layer_types[index]
        self.head_dim = hd = g.head_dims[index]
        self.reuses = g.kv_modes[index] == "reuse"
        self.stores = g.kv_modes[index] == "store"
        self.has_v = g.has_v(index)
        self.q_size, self.kv_size = a.num_heads * hd, g.kv_heads[index] * hd
        # q alone (a reusing layer), q and k (values are keys), or q, k and v: one packed
        # projection under the name qkv_proj, so q_proj's weights and LoRA load alike
        leaves = ("q_proj",) if self.reuses else \
            ("q_proj", "k_proj", "v_proj")[:3 if self.has_v else 2]
        sizes = [self.q_size] + [self.kv_size] * (len(leaves) - 1)
        self.qkv_proj = make_linear(a.hidden_size, sizes, False, a.quant,
                                    tuple(f"{prefix}.{leaf}" for leaf in leaves))
        self.o_proj = make_linear(self.q_size, [a.hidden_size], False, a.quant,
                                  (f"{prefix}.o_proj",))
        self.q_norm = Gemma4RMSNorm(hd, a.norm_eps)
        if not self.reuses:
            self.k_norm = Gemma4RMSNorm(hd, a.norm_eps)
            self.v_norm = Gemma4RMSNorm(hd, a.norm_eps, with_scale=False)
        self.rotary = rotary
        window = a.sliding_window if self.layer_type == SLIDING else None
        self.attn = Attention(a.num_heads, g.kv_heads[index], hd, 1.0, window=window or 0)
        # an image's tokens see each other both ways on the sliding layers only (HF's
        # use_bidirectional_attention "vision"; models/gemma4_vision.py)
        self.attn.images_causal = self.layer_type == FULL

    def forward(self, positions: torch.Tensor, x: torch.Tensor, shared: SharedKV
                ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        q = self.q_norm(qkv[:, :self.q_size].view(t, -1, self.head_dim))  # [T, H, D]
        if self.reuses:  # the storing layer's K/V of this step (its cache: the rest)
            q, _ = self.rotary(positions, q, q[:, :1])
            k, v = shared[self.layer_type]
        else:
            k_raw = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, -1, self.head_dim)
            v_raw = qkv[:, self.q_size + self.kv_size:].view(t, -1, self.head_dim) \
                if self.has_v else k_raw
            v = self.v_norm(v_raw)
            q, k = self.rotary(positions, q, self.k_norm(k_raw))
            if self.stores:
                shared[self.layer_type] = (k, v)
        return self.o_proj(self.attn(q, k, v))


def share_kv_caches(layers: nn.ModuleList, g: Gemma4Args) -> None:
    """Each reusing layer's Attention reads its storing layer's cache (`reads_kv_of`)."""
    for i, layer in enumerate(layers):
        source = g.kv_source(i)
        if source != i:
            layer.self_attn.attn.reads_kv_of = layers[source].self_attn.attn


class Gemma4Router(nn.Module):
    """Top-k of the softmax over all experts, renormalized, times each expert's scale."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float,
                 quant: QuantConfig | None = None, prefix: str = "router") -> None:
        super().__init__()
        self.top_k = top_k
        self.norm = Gemma4RMSNorm(hidden_size, eps, with_scale=False)
        self.scale = nn.Parameter(torch.ones(hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))
        # (plain: a quantized checkpoint's dequantized as it loads)
        self.proj = NamedGateLinear(hidden_size, num_experts, quant, f"{prefix}.proj")
        self.root = hidden_size ** -0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * self.per_expert_scale[experts]).to(x.dtype), experts


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int
                 ) -> None:
        super().__init__()
        g = a.gemma4
        self.self_attn = Gemma4Attention(a, rotary, f"{prefix}.self_attn", index)
        wide = 2 if g.double_wide and g.kv_modes[index] == "reuse" else 1
        self.mlp = LlamaMLP(a, f"{prefix}.mlp", a.intermediate_size * wide)
        h, eps = a.hidden_size, a.norm_eps
        for name in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            setattr(self, name, Gemma4RMSNorm(h, eps))
        self.layer_scalar = nn.Parameter(torch.ones(1))  # (a buffer in HF, saved)
        self.ple = g.ple_size > 0
        if self.ple:
            self.act = ACTIVATIONS[a.hidden_act]
            self.per_layer_input_gate = make_linear(h, [g.ple_size], False, a.quant,
                                                    (f"{prefix}.per_layer_input_gate",))
            self.per_layer_projection = make_linear(g.ple_size, [h], False, a.quant,
                                                    (f"{prefix}.per_layer_projection",))
            self.post_per_layer_input_norm = Gemma4RMSNorm(h, eps)
        self.moe = g.num_experts > 0
        if self.moe:
            self.router = Gemma4Router(h, g.num_experts, g.top_k, eps, a.quant,
                                       f"{prefix}.router")
            # (plain in a quantized checkpoint too: models/gemma_quant.py)
            self.experts = GemmaPlainExperts(h, g.moe_intermediate_size, g.num_experts,
                                             fused=True, act=_gelu_glu)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                setattr(self, name, Gemma4RMSNorm(h, eps))

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                per_layer_input: torch.Tensor | None, shared: SharedKV) -> torch.Tensor:
        h = x + self.post_attention_layernorm(
            self.self_attn(positions, self.input_layernorm(x), shared))
        y = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:  # the experts beside the MLP, on the same residual stream
            weights, experts = self.router(h)
            routed = self.experts(self.pre_feedforward_layernorm_2(h), weights, experts)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(routed)
        h = h + self.post_feedforward_layernorm(y)
        if self.ple:
            gated = self.act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return h * self.layer_scalar


class Gemma4Model(nn.Module):
    """What the engine reads of a decoder (LlamaModel's embed_tokens, rotary, layers,
    norm, aux_layers), over Gemma 4's layers."""

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        g = a.gemma4
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.embed_scale = a.hidden_size ** 0.5
        # the sliding layers' rope is the model's `rotary` (the runner reads its rows)
        self.rotary = RotaryEmbedding(g.head_dims[g.layer_types.index(SLIDING)]
                                      if SLIDING in g.layer_types else g.head_dims[0],
                                      a.max_position, a.rope_theta, a.rope_scaling,
                                      rows=a.rope_rows)
        rotary = {SLIDING: self.rotary}
        if FULL in g.layer_types:
            self.rotary_full = rotary[FULL] = RotaryEmbedding(
                g.head_dims[g.layer_types.index(FULL)], a.max_position, *g.full_rope,
                rows=a.rope_rows)
        self.layers = nn.ModuleList(
            Gemma4DecoderLayer(a, rotary[t], f"model.layers.{i}", i)
            for i, t in enumerate(g.layer_types))
        share_kv_caches(self.layers, g)
        self.norm = Gemma4RMSNorm(a.hidden_size, a.norm_eps)
        self.ple_size, self.num_layers = g.ple_size, a.num_layers
        self.pad_token_id = g.pad_token_id
        if g.ple_size:
            width = a.num_layers * g.ple_size
            self.embed_tokens_per_layer = nn.Embedding(g.ple_vocab, width)
            self.per_layer_model_projection = make_linear(
                a.hidden_size, [width], False, a.quant, ("model.per_layer_model_projection",))
            self.per_layer_projection_norm = Gemma4RMSNorm(g.ple_size, a.norm_eps)
        self.aux_hidden_states: torch.Tensor | None = None

    @property
    def aux_layers(self) -> tuple[int, ...] | None:
        """The layers whose inputs an EAGLE-3 head reads: none here."""
        return None

    @aux_layers.setter
    def aux_layers(self, layers: tuple[int, ...] | None) -> None:
        if layers is not None:
            raise ValueError("EAGLE-3 speculative decoding is not supported on Gemma 4 or "
                             "Gemma 3n")

    def given_embeds_scale(self, dtype: torch.dtype) -> float:
        """prompt_embeds: refused, the per-layer embeddings need each token's id."""
        raise ValueError("prompt_embeds: not supported for Gemma 4, whose per-layer "
                         "embeddings are looked up by token id")

    def _scaled(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return x * float(torch.tensor(scale, dtype=x.dtype))  # the scale in x's dtype, as HF

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each token's inputs to the layers [T, L, P]: its per-layer embedding rows and the
        normed projection of its embedding x, averaged as HF does (sum x 2^-1/2)."""
        t, p = input_ids.shape[0], self.ple_size
        rows = self._scaled(self.embed_tokens_per_layer(input_ids), p ** 0.5).view(t, -1, p)
        proj = self.per_layer_model_projection(x) * x.shape[-1] ** -0.5
        proj = self.per_layer_projection_norm(proj.view(t, -1, p))
        return (proj + rows) * 2 ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        x = self._scaled(self.embed_tokens(input_ids), self.embed_scale)
        if image_rows is not None:  # images (models/gemma4_vision.py): their vectors
            # unscaled at their rows, whose per-layer embeddings are the pad token's (HF's)
            rows, embeds = image_rows
            x = x.index_copy(0, rows, embeds.to(x.dtype))
            input_ids = input_ids.index_fill(0, rows, self.pad_token_id)
        ple = self.per_layer_inputs(input_ids, x) if self.ple_size else None
        shared: SharedKV = {}
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, ple[:, i] if ple is not None else None, shared)
        return self.norm(x)


class Gemma4ForCausalLM(LlamaForCausalLM):
    decoder_class = Gemma4Model
    # the per-layer embeddings' linears beside the usual ones
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "per_layer_input_gate", "per_layer_projection",
                           "per_layer_model_projection", "embed_tokens", "lm_head")

    def __init__(self, args: LlamaArgs) -> None:
        if args.gemma4.num_experts:  # the routed experts (not the router: PEFT's `proj`
            # there is served by no slot)
            self.lora_target_modules = self.lora_target_modules + ("experts",)
        super().__init__(args)

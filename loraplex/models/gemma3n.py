"""Gemma 3n's text decoder (`Gemma3nForCausalLM`, model_type gemma3n_text; the language
model of `Gemma3nForConditionalGeneration`, served on text by models/text_only.py).

Gemma 4's attention (models/gemma4.py: q/k/v norms, v's without a weight, scale 1.0,
sliding and full layers each with its rope, KV sharing: the last num_kv_shared_layers
layers read the K/V of the last earlier layer of their type and hold no cache) and its
per-layer embeddings (a token id past vocab_size_per_layer_input reads row 0, as HF),
in layers of their own:
- AltUp (layers/altup.py): the residual stream is altup_num_inputs streams; each layer
  predicts them, computes on the active one, corrects them all by its output.
- LAuReL: beside the attention, normed + norm(linear_right(linear_left(normed))), which
  joins the attention's residual output, the sum x 2^-1/2.
- The MLP's width is per layer; on the layers of activation_sparsity_pattern > 0 the
  gate keeps only what exceeds mean + std * Phi^-1(sparsity) of its row (a Gaussian
  top-k), before the GELU.
- After the MLP the (scaled) active stream gates the layer's per-layer input, whose
  projection, normed, is added to every stream but the first.
- The final logits are capped (final_logit_softcapping).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.layers.activation import ACTIVATIONS
from loraplex.layers.altup import AltUp, collapse_streams, expand_streams
from loraplex.layers.linear import make_linear
from loraplex.layers.norm import Gemma4RMSNorm
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.gemma4 import Gemma4Attention, Gemma4Model, SharedKV, share_kv_caches
from loraplex.models.gemma4_args import FULL, SLIDING
from loraplex.models.llama import LlamaArgs, LlamaForCausalLM


def gaussian_cutoff(sparsity: float) -> float:
    """Phi^-1(sparsity) in fp32, as HF computes it: the gate's cutoff in row stds."""
    target = torch.tensor(sparsity, dtype=torch.float32)
    return float(torch.distributions.normal.Normal(0, 1).icdf(target))


class Gemma3nMLP(nn.Module):
    def __init__(self, a: LlamaArgs, prefix: str, index: int) -> None:
        super().__init__()
        size = a.gemma3n.intermediate_sizes[index]
        self.size = size
        self.gate_up_proj = make_linear(a.hidden_size, [size] * 2, False, a.quant,
                                        (f"{prefix}.gate_proj", f"{prefix}.up_proj"))
        self.down_proj = make_linear(size, [a.hidden_size], False, a.quant,
                                     (f"{prefix}.down_proj",))
        sparsity = a.gemma3n.sparsity[index]
        self.cutoff = gaussian_cutoff(sparsity) if sparsity > 0.0 else None
        self.act = ACTIVATIONS[a.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.size, dim=-1)
        if self.cutoff is not None:  # (the cutoff in x's dtype, as HF)
            std = torch.std(gate, dim=-1, keepdim=True, unbiased=False)
            cut = gate.mean(-1, keepdim=True) + std * torch.tensor(self.cutoff, dtype=x.dtype)
            gate = torch.relu(gate - cut)
        return self.down_proj(self.act(gate) * up)


class Laurel(nn.Module):
    """The learned augmented residual: x + norm(right(left(x))), rank laurel_rank."""

    def __init__(self, a: LlamaArgs, prefix: str) -> None:
        super().__init__()
        h, r = a.hidden_size, a.gemma3n.laurel_rank
        self.linear_left = make_linear(h, [r], False, a.quant, (f"{prefix}.linear_left",))
        self.linear_right = make_linear(r, [h], False, a.quant, (f"{prefix}.linear_right",))
        self.post_laurel_norm = Gemma4RMSNorm(h, a.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, rotary: RotaryEmbedding, prefix: str, index: int
                 ) -> None:
        super().__init__()
        g, h, eps = a.gemma3n, a.hidden_size, a.norm_eps
        self.active, self.correct_scale = g.altup_active_idx, g.altup_correct_scale
        self.self_attn = Gemma4Attention(a, rotary, f"{prefix}.self_attn", index)
        self.self_attn.attn.images_causal = True  # (no images: text only)
        self.mlp = Gemma3nMLP(a, f"{prefix}.mlp", index)
        for name in ("input_layernorm", "post_attention_layernorm",
                     "pre_feedforward_layernorm", "post_feedforward_layernorm",
                     "post_per_layer_input_norm"):
            setattr(self, name, Gemma4RMSNorm(h, eps))
        self.altup = AltUp(h, g.altup_num_inputs, g.altup_active_idx, eps, a.quant,
                           f"{prefix}.altup")
        self.laurel = Laurel(a, f"{prefix}.laurel")
        self.act = ACTIVATIONS[a.hidden_act]
        ple = a.gemma4.ple_size
        self.per_layer_input_gate = make_linear(h, [ple], False, a.quant,
                                                (f"{prefix}.per_layer_input_gate",))
        self.per_layer_projection = make_linear(ple, [h], False, a.quant,
                                                (f"{prefix}.per_layer_projection",))

    def forward(self, positions: torch.Tensor, streams: torch.Tensor,
                per_layer_input: torch.Tensor, shared: SharedKV) -> torch.Tensor:
        """streams [n, T, D] -> [n, T, D]; per_layer_input [T, P]."""
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        attn = self.post_attention_layernorm(self.self_attn(positions, normed, shared))
        h = (active + attn + self.laurel(normed)) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)
        first = corrected[self.active]
        if self.correct_scale:
            first = self.altup.scale_corrected(first)
        gated = self.act(self.per_layer_input_gate(first)) * per_layer_input
        update = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return torch.cat([corrected[:1], corrected[1:] + update])


class Gemma3nModel(nn.Module):
    """What the engine reads of a decoder (LlamaModel's embed_tokens, rotary, layers,
    norm, aux_layers), over Gemma 3n's layers."""

    # Gemma 4's: no EAGLE-3 aux layers, the per-layer inputs
    aux_layers = Gemma4Model.aux_layers
    _scaled = Gemma4Model._scaled
    per_layer_inputs = Gemma4Model.per_layer_inputs

    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        g4, g = a.gemma4, a.gemma3n
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.embed_scale = a.hidden_size ** 0.5
        self.rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta,
                                      a.rope_scaling, rows=a.rope_rows)
        self.rotary_full = RotaryEmbedding(a.head_dim, a.max_position, *g4.full_rope,
                                           rows=a.rope_rows)
        rotary = {SLIDING: self.rotary, FULL: self.rotary_full}
        self.layers = nn.ModuleList(
            Gemma3nDecoderLayer(a, rotary[t], f"model.layers.{i}", i)
            for i, t in enumerate(g4.layer_types))
        share_kv_caches(self.layers, g4)
        self.norm = Gemma4RMSNorm(a.hidden_size, a.norm_eps)
        self.ple_size, self.ple_vocab, self.num_layers = g4.ple_size, g4.ple_vocab, a.num_layers
        width = a.num_layers * g4.ple_size
        self.embed_tokens_per_layer = nn.Embedding(g4.ple_vocab, width)
        self.per_layer_model_projection = make_linear(
            a.hidden_size, [width], False, a.quant, ("model.per_layer_model_projection",))
        self.per_layer_projection_norm = Gemma4RMSNorm(g4.ple_size, a.norm_eps)
        self.altup_projections, self.altup_unembed_projections = (nn.ModuleList(
            make_linear(a.hidden_size, [a.hidden_size], False, a.quant, (f"model.{name}.{i}",))
            for i in range(g.altup_num_inputs - 1))
            for name in ("altup_projections", "altup_unembed_projections"))
        self.aux_hidden_states: torch.Tensor | None = None

    def given_embeds_scale(self, dtype: torch.dtype) -> float:
        """prompt_embeds: refused, the per-layer embeddings need each token's id."""
        raise ValueError("prompt_embeds: not supported for Gemma 3n, whose per-layer "
                         "embeddings are looked up by token id")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: None = None) -> torch.Tensor:
        if image_rows is not None:
            raise ValueError("Gemma 3n is served on text only")
        x = self._scaled(self.embed_tokens(input_ids), self.embed_scale)
        in_table = input_ids < self.ple_vocab  # the multimodal tokens past it: row 0 (HF)
        ple = self.per_layer_inputs(torch.where(in_table, input_ids, 0), x)  # [T, L, P]
        streams = expand_streams(x, self.altup_projections)  # [n, T, D]
        shared: SharedKV = {}
        for i, layer in enumerate(self.layers):
            streams = layer(positions, streams, ple[:, i], shared)
        return self.norm(collapse_streams(streams, self.altup_unembed_projections))


class Gemma3nForCausalLM(LlamaForCausalLM):
    decoder_class = Gemma3nModel
    # Gemma 4's targets and LAuReL's; not AltUp's coefficient / router linears (nor the
    # streams' projections, named by their index alone), which have no adapter slots
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "per_layer_input_gate", "per_layer_projection",
                           "per_layer_model_projection", "linear_left", "linear_right",
                           "embed_tokens", "lm_head")
    lora_refused_modules = {name: "LoRA on Gemma 3n's AltUp linears is not supported (PEFT's "
                            "all-linear targets them: train with the attention, MLP, LAuReL "
                            "and per-layer projections as target_modules)" for name in (
                                "altup_projections", "altup_unembed_projections",
                                "modality_router", "prediction_coefs", "correction_coefs")}

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args)
        # the KV-sharing layers' k/v_proj: transformers 4.56 builds them (PEFT puts a LoRA
        # there) but runs them only without a cache; 5.x has none
        self.lora_ignored_modules = tuple(
            f"model.layers.{i}.self_attn.{m}" for i, mode in enumerate(args.gemma4.kv_modes)
            if mode == "reuse" for m in ("k_proj", "v_proj"))

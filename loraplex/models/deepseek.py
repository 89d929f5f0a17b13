"""DeepSeek-V2 / V3 configs (DeepSeek-V2-Lite, Moonlight, DeepSeek-V3 / R1, Kimi-K2) and
GLM-4.7-Flash's (`Glm4MoeLiteForCausalLM`: DeepSeek-V3's attention and routing, its dense
layers named by `mlp_layer_types`) -> the Llama-family decoder's flags: multi-head latent
attention (layers/mla.py) and the mixture of experts (layers/moe.py), as HF transformers
builds them.

- Attention: MLA; its rotary part turns pairs (2i, 2i+1) (V2 always, through complex
  numbers; V3 where `rope_interleave`, else halves); the cache holds the latent
  (kv_lora_rank + qk_rope values a token and layer, worker/memory.py's kv_cache_layout).
- Experts: V3 routes by grouped sigmoid scores with a correction bias ("noaux_tc"), V2 by
  softmax ("greedy", or "group_limited_greedy" within n_group groups); both add
  n_shared_experts ungated shared experts. Layer i has experts when
  i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's code and vLLM; HF
  reads no moe_layer_freq, every released config says 1); the others a plain MLP of
  intermediate_size.
"""

from __future__ import annotations

from typing import Any

from loraplex.layers.mla import MLAArgs, mla_softmax_scale
from loraplex.layers.moe import GroupedTopK

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
                          "Glm4MoeLiteForCausalLM")
DEEPSEEK_MODEL_TYPES = {"deepseek_v2": "DeepseekV2ForCausalLM",
                        "deepseek_v3": "DeepseekV3ForCausalLM",
                        "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}
_V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def mla_args(hf: Any, name: str, rope_scaling: dict | None) -> dict[str, Any]:
    """LlamaArgs fields of a DeepSeek attention: `mla` (which shapes the cache), the heads
    and query / key head dim of the decompressed form, the rotary dim and layout, and the
    biases (attention_bias: q_a_proj, kv_a_proj and o_proj; V2's mlp_bias: every MLP)."""
    rope = getattr(hf, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):  # HF would rotate part of qk_rope_head_dim only
        raise ValueError(f"{name} with partial_rotary_factor={partial} is not supported: "
                         "latent attention rotates all of qk_rope_head_dim")
    mla = MLAArgs(q_lora_rank=int(hf.q_lora_rank) if hf.q_lora_rank else None,
                  kv_lora_rank=int(hf.kv_lora_rank),
                  qk_nope_head_dim=int(hf.qk_nope_head_dim),
                  qk_rope_head_dim=int(hf.qk_rope_head_dim),
                  v_head_dim=int(hf.v_head_dim),
                  scale=mla_softmax_scale(int(hf.qk_nope_head_dim) + int(hf.qk_rope_head_dim),
                                          rope_scaling))
    interleaved = name == "DeepseekV2ForCausalLM" or bool(getattr(hf, "rope_interleave", True))
    return dict(mla=mla, num_kv_heads=int(hf.num_attention_heads),
                head_dim=mla.qk_head_dim, rotary_dim=mla.qk_rope_head_dim,
                rope_interleaved=interleaved,
                qkv_bias=bool(getattr(hf, "attention_bias", False)),
                o_bias=bool(getattr(hf, "attention_bias", False)),
                mlp_bias=name == "DeepseekV2ForCausalLM" and bool(getattr(hf, "mlp_bias", False)))


def _routing(hf: Any, name: str) -> GroupedTopK:
    scaling = float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0)
    groups, eligible = int(getattr(hf, "n_group", None) or 1), \
        int(getattr(hf, "topk_group", None) or 1)
    if name != "DeepseekV2ForCausalLM":  # noaux_tc whatever topk_method says (as HF)
        return GroupedTopK(groups, eligible, scaling)
    method = getattr(hf, "topk_method", "greedy") or "greedy"
    if method not in _V2_TOPK_METHODS:
        raise ValueError(f"DeepSeek-V2 topk_method={method!r} is not supported; supported: "
                         + ", ".join(_V2_TOPK_METHODS))
    if getattr(hf, "norm_topk_prob", False):  # DeepSeek's code renormalizes instead of
        # scaling, vLLM does both, HF neither: refused rather than guessed
        raise ValueError("DeepSeek-V2 with norm_topk_prob=True is not supported: its "
                         "reference implementations disagree on the routing weights")
    if method == "greedy":
        return GroupedTopK(1, 1, scaling, scoring="softmax")
    return GroupedTopK(groups, eligible, scaling, scoring="softmax")


def deepseek_experts(hf: Any, name: str) -> dict[str, Any]:
    """LlamaArgs fields of a DeepSeek mixture of experts."""
    freq = int(getattr(hf, "moe_layer_freq", 1) or 1)
    first = int(getattr(hf, "first_k_dense_replace", 0) or 0)
    shared = int(getattr(hf, "n_shared_experts", 0) or 0)
    types = getattr(hf, "mlp_layer_types", None)  # GLM-4.7-Flash's: "dense" / "sparse"
    dense = tuple(i for i in range(hf.num_hidden_layers) if types[i] != "sparse") if types \
        else tuple(i for i in range(hf.num_hidden_layers) if i < first or i % freq)
    return dict(num_experts=int(hf.n_routed_experts),
                num_experts_per_tok=int(hf.num_experts_per_tok),
                moe_intermediate_size=int(hf.moe_intermediate_size),
                norm_topk_prob=name != "DeepseekV2ForCausalLM" and bool(hf.norm_topk_prob),
                moe_module="mlp", grouped_topk=_routing(hf, name),
                shared_expert_intermediate_size=int(hf.moe_intermediate_size) * shared,
                shared_expert_name="shared_experts",
                dense_layers=dense)

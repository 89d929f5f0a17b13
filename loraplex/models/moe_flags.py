"""The mixture-of-experts flags each architecture's config gives the Llama-family decoder
(models/llama.py, layers/moe.py): experts per layer and per token, their size, how the
router's weights are normalized, the layers that keep a plain MLP, shared experts, the
routing (grouped sigmoid, softmax, sparsemixer, gpt-oss's top-k softmax), and which
quantized mixtures of experts load. models/registry.py reads them into LlamaArgs.
"""

from __future__ import annotations

from typing import Any

from loraplex.layers.activation import ClampedSwiGLU
from loraplex.layers.moe import GroupedTopK
from loraplex.layers.quantization import QuantConfig
from loraplex.models.deepseek import DEEPSEEK_ARCHITECTURES, deepseek_experts


def moe_flags(hf: Any, name: str, quant: QuantConfig | None) -> dict[str, Any]:
    """A mixture of experts: experts per layer and per token, and (Qwen's) the experts'
    size, the routing weights' normalization, the layers that keep a plain MLP and
    (Qwen2-MoE) the shared expert's size; gpt-oss's clamped SwiGLU."""
    if quant is not None and quant.method == "mxfp4" and name != "GptOssForCausalLM":
        raise ValueError(f"mxfp4-quantized {name} models are not supported: loraplex loads "
                         "MXFP4 experts of gpt-oss (GptOssForCausalLM)")
    if name not in ("MixtralForCausalLM", "PhimoeForCausalLM", "Qwen2MoeForCausalLM",
                    "Qwen3MoeForCausalLM", "GptOssForCausalLM", "Glm4MoeForCausalLM",
                    "OlmoeForCausalLM",
                    "MiniMaxM2ForCausalLM", "Ernie4_5_MoeForCausalLM", "HunYuanMoEV1ForCausalLM",
                    "Dots1ForCausalLM",
                    *DEEPSEEK_ARCHITECTURES):
        return {}
    supported = ("mxfp4",) if name == "GptOssForCausalLM" else (
        "fp8", "gptq", "awq", "compressed-tensors", "bitsandbytes")
    if quant is not None and quant.method not in supported:
        raise ValueError(f"{quant.method}-quantized {name} models are not supported yet "
                         "(FP8, GPTQ, AWQ, compressed-tensors int and bitsandbytes 4-bit "
                         "mixtures of experts are, and gpt-oss in MXFP4)")
    if quant is not None and quant.method == "bitsandbytes" and quant.bits == 8:
        raise ValueError(f"bitsandbytes 8-bit {name} models are not supported yet: loraplex "
                         "loads 4-bit (NF4 / FP4) mixtures of experts, prequantized or with "
                         "quantization='bitsandbytes' on the plain checkpoint")
    if name == "MixtralForCausalLM":
        return dict(num_experts=int(hf.num_local_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok),
                    expert_leaves=("w1", "w3", "w2"))
    if name == "PhimoeForCausalLM":  # Mixtral's experts, its sparsemixer's top-2
        if int(hf.num_experts_per_tok) != 2:
            raise ValueError(f"Phi-3.5-MoE with num_experts_per_tok={hf.num_experts_per_tok}"
                             " is not supported: its sparsemixer routes to 2 experts")
        return dict(num_experts=int(hf.num_local_experts), num_experts_per_tok=2,
                    expert_leaves=("w1", "w3", "w2"),
                    sparsemixer_eps=float(hf.router_jitter_noise))
    if name == "GptOssForCausalLM":  # transformers 4.55-4.57 had no swiglu_alpha field
        return dict(num_experts=int(hf.num_local_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok), moe_module="mlp",
                    gpt_oss_experts=ClampedSwiGLU(float(getattr(hf, "swiglu_alpha", 1.702)),
                                                  float(hf.swiglu_limit)))
    if name in DEEPSEEK_ARCHITECTURES:
        return deepseek_experts(hf, name)
    if name == "OlmoeForCausalLM":  # every layer's, intermediate_size each
        if getattr(hf, "clip_qkv", None) is not None:
            raise ValueError("OLMoE with clip_qkv is not supported (no released checkpoint "
                             "sets it)")
        return dict(num_experts=int(hf.num_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok),
                    moe_intermediate_size=int(hf.intermediate_size),
                    norm_topk_prob=bool(hf.norm_topk_prob), moe_module="mlp")
    if name == "MiniMaxM2ForCausalLM":  # sigmoid scores + correction bias, one group
        return dict(num_experts=int(hf.num_local_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok),
                    expert_leaves=("w1", "w3", "w2"), norm_topk_prob=True,
                    grouped_topk=GroupedTopK(1, 1, 1.0))
    if name == "Ernie4_5_MoeForCausalLM":  # experts every moe_layer_interval-th layer
        # of [moe_layer_start_index, moe_layer_end_index], the others dense (HF's rule)
        end = int(hf.moe_layer_end_index)
        end = hf.num_hidden_layers - 1 if end == -1 else end
        interval, start = int(hf.moe_layer_interval), int(hf.moe_layer_start_index)
        shared = int(getattr(hf, "moe_num_shared_experts", 0) or 0)
        return dict(num_experts=int(hf.num_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok),
                    moe_intermediate_size=int(hf.moe_intermediate_size),
                    norm_topk_prob=True, moe_module="mlp",
                    grouped_topk=GroupedTopK(1, 1, 1.0, "softmax_bias"),
                    shared_expert_intermediate_size=int(hf.moe_intermediate_size) * shared,
                    shared_expert_name="shared_experts",
                    dense_layers=tuple(i for i in range(hf.num_hidden_layers)
                                       if (i + 1) % interval or not start <= i <= end))
    if name == "HunYuanMoEV1ForCausalLM":  # every layer's; experts and the shared MLP of
        # intermediate_size each, as HF's port builds them
        top_k = {hf.moe_topk} if isinstance(hf.moe_topk, int) else set(hf.moe_topk)
        if len(top_k) != 1 or not isinstance(hf.num_experts, int):
            raise ValueError("Hunyuan MoE with a different moe_topk or num_experts per layer "
                             "is not supported")
        return dict(num_experts=int(hf.num_experts), num_experts_per_tok=int(top_k.pop()),
                    moe_intermediate_size=int(hf.intermediate_size), norm_topk_prob=True,
                    moe_module="mlp", grouped_topk=GroupedTopK(1, 1, 1.0, "softmax"),
                    shared_expert_intermediate_size=int(hf.intermediate_size),
                    shared_expert_name="shared_mlp")
    if name in ("Glm4MoeForCausalLM", "Dots1ForCausalLM"):  # its first layers dense;
        # shared experts, ungated
        return dict(num_experts=int(hf.n_routed_experts),
                    num_experts_per_tok=int(hf.num_experts_per_tok),
                    moe_intermediate_size=int(hf.moe_intermediate_size),
                    norm_topk_prob=bool(hf.norm_topk_prob), moe_module="mlp",
                    grouped_topk=GroupedTopK(int(hf.n_group), int(hf.topk_group),
                                             float(hf.routed_scaling_factor)),
                    shared_expert_intermediate_size=int(hf.moe_intermediate_size)
                    * int(hf.n_shared_experts),
                    shared_expert_name="shared_experts",
                    dense_layers=tuple(range(int(hf.first_k_dense_replace))))
    step, only_mlp = int(getattr(hf, "decoder_sparse_step", 1) or 1), \
        set(getattr(hf, "mlp_only_layers", None) or [])
    # Qwen3-VL-MoE's language model (a Qwen3-MoE): its experts fused in the checkpoint,
    # and HF's router always renormalizes the top-k (its config has no norm_topk_prob)
    vl_moe = getattr(hf, "model_type", None) == "qwen3_vl_moe_text"
    if vl_moe and quant is not None:
        raise ValueError(f"{quant.method}-quantized Qwen3-VL-MoE checkpoints are not "
                         "supported yet: its fused experts load unquantized only")
    return dict(num_experts=int(hf.num_experts), num_experts_per_tok=int(hf.num_experts_per_tok),
                moe_intermediate_size=int(hf.moe_intermediate_size),
                norm_topk_prob=vl_moe or bool(getattr(hf, "norm_topk_prob", False)),
                moe_module="mlp", fused_experts=vl_moe,
                shared_expert_intermediate_size=int(
                    getattr(hf, "shared_expert_intermediate_size", 0) or 0),
                dense_layers=tuple(i for i in range(hf.num_hidden_layers)
                                   if i in only_mlp or (i + 1) % step))

"""Which quantized checkpoints the hybrid models load (Qwen3-Next / Qwen3.5 / Qwen3.5-MoE,
LFM2 / LFM2-MoE, Mamba / FalconMamba / Jamba, Kimi-Linear): those whose every quantized
tensor lands in a layer the shared quantized code already has. Their mixers' projections
(Kimi's KDA ones and latent attention's too) are plain linears (make_linear), so they take
any linear format; the conv weights, A_log, dt_bias,
norms and routers stay plain, as every quantizer leaves them (a router a checkpoint
quantized loads dequantized: GateLinear). Their experts are layers/quantized_experts.py's,
which hold FP8, packed int and bitsandbytes 4-bit ones, not NVFP4 or MXFP4.
"""

from __future__ import annotations

from loraplex.layers.quantization import QuantConfig

# quant_config_from_hf's methods a hybrid's linears run ("fp8": compressed-tensors' FP8
# too; "compressed-tensors": its int weights; "nvfp4": its NVFP4 ones)
LINEAR_METHODS = ("fp8", "compressed-tensors", "nvfp4", "gptq", "awq", "bitsandbytes")
# ... and its experts (quantized_experts.py's; bitsandbytes 4-bit only)
EXPERT_METHODS = ("fp8", "compressed-tensors", "gptq", "awq", "bitsandbytes")
_NAMES = {"fp8": "FP8 (fp8, compressed-tensors FP8)",
          "compressed-tensors": "compressed-tensors int (W4A16 / W8A16)",
          "nvfp4": "compressed-tensors NVFP4", "gptq": "GPTQ", "awq": "AWQ",
          "bitsandbytes": "bitsandbytes"}


def check_hybrid_quant(quant: QuantConfig | None, name: str, experts: bool) -> None:
    """Refuse what `name` (`experts`: a model with a mixture of experts) cannot load,
    naming what it can."""
    if quant is None:
        return
    methods = EXPERT_METHODS if experts else LINEAR_METHODS
    bnb8 = quant.method == "bitsandbytes" and quant.bits == 8 and experts
    if quant.method not in methods or bnb8:
        what = "bitsandbytes 8-bit" if bnb8 else f"{quant.method}-quantized"
        raise ValueError(f"{what} {name} checkpoints are not supported yet: loraplex loads "
                         f"{', '.join(_NAMES[m] for m in methods)} ones of it"
                         + (" (bitsandbytes 4-bit only)" if experts else ""))

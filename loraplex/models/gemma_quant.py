"""Which quantized checkpoints Gemma 4's and Gemma 3n's text decoders load (models/gemma4.py,
models/gemma3n.py): the linear formats the hybrids take (models/hybrid_quant.py), since
every projection of theirs is a make_linear one: attention's, the MLP's, the per-layer
embeddings' gate and projections, LAuReL's and AltUp's stream projections. A module the
checkpoint's not-convert list names (its towers, lm_head, per_layer_model_projection,
as real ones leave them) loads plain. The small routers (Gemma 4's experts' `proj`, AltUp's
modality_router and its coefficient linears) are GateLinear: kept exact, dequantized
where a checkpoint quantized them.

Gemma 4's experts (fused gate_up_proj / down_proj, a GeGLU) stay plain: a checkpoint that
quantized them is refused by name (GemmaPlainExperts); under quantization="fp8" /
"bitsandbytes" on a plain checkpoint they load as they are, unquantized.
"""

from __future__ import annotations

import torch

from loraplex.layers.experts import FusedExperts
from loraplex.layers.quantization import QuantConfig
from loraplex.models.hybrid_quant import check_hybrid_quant

_EXPERTS_REFUSED = ("quantized Gemma 4 experts are not supported yet (got {what}): loraplex "
                    "serves Gemma 4 checkpoints whose experts are left unquantized, as "
                    "HF saves them (experts.gate_up_proj / experts.down_proj in the "
                    "checkpoint's dtype; the quantization config's ignore list names them)")


def check_gemma_quant(quant: QuantConfig | None, name: str) -> None:
    """Refuse a quantization `name` (Gemma 4 / Gemma 3n) cannot load, naming what it can."""
    check_hybrid_quant(quant, name, experts=False)


class GemmaPlainExperts(FusedExperts):
    """Gemma 4's experts, plain whatever the checkpoint's method: its fused tensors load
    as FusedExperts loads them; quantized ones (FP8 or int tensors, scales, or per-expert
    linears as a quantizer that split them saves them) are refused by name."""

    def load_fused(self, name: str, tensor: torch.Tensor) -> str:
        plain = tensor.is_floating_point() and tensor.element_size() > 1
        if name not in ("gate_up_proj", "down_proj") or not plain:
            raise ValueError(_EXPERTS_REFUSED.format(what=f"experts.{name} ({tensor.dtype})"))
        return super().load_fused(name, tensor)

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        raise ValueError(_EXPERTS_REFUSED.format(
            what=f"experts.{expert}.{name}.{kind} ({tensor.dtype})"))

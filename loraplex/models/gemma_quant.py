"""Which quantized checkpoints Gemma 4's and Gemma 3n's text decoders load (models/gemma4.py,
models/gemma3n.py): the linear formats the hybrids take (models/hybrid_quant.py), since
every projection of theirs is a make_linear one: attention's, the MLP's, the per-layer
embeddings' gate and projections, LAuReL's and AltUp's stream projections. A module the
checkpoint's not-convert list names (its towers, lm_head, per_layer_model_projection,
as real ones leave them) loads plain. The small routers (Gemma 4's experts' `proj`, AltUp's
modality_router and its coefficient linears) are GateLinears (NamedGateLinear): kept
exact, dequantized where a checkpoint quantized them in a format whose linear holds their
shape (a packed int one does not: their 3-8 outputs fill no int32; refused naming them).

Gemma 4's experts (fused gate_up_proj / down_proj, a GeGLU) stay plain: a checkpoint that
quantized them is refused by name (GemmaPlainExperts); under quantization="fp8" /
"bitsandbytes" on a plain checkpoint they load as they are, unquantized.
"""

from __future__ import annotations

import torch

from loraplex.layers.experts import FusedExperts
from loraplex.layers.moe import GateLinear
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
    """Gemma 4's experts, plain whatever the checkpoint's method: its plain tensors (fused,
    or per expert) load as FusedExperts loads them; quantized ones (FP8 or int tensors,
    their scales, fused or per expert as a quantizer that split them saves them) are
    refused by name."""

    def load_fused(self, name: str, tensor: torch.Tensor) -> str:
        if name not in ("gate_up_proj", "down_proj") or not _plain(tensor):
            raise ValueError(_EXPERTS_REFUSED.format(what=f"experts.{name} ({tensor.dtype})"))
        return super().load_fused(name, tensor)

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        if kind != "weight" or not _plain(tensor):
            raise ValueError(_EXPERTS_REFUSED.format(
                what=f"experts.{expert}.{name}.{kind} ({tensor.dtype})"))
        return super().load_expert(expert, name, tensor, kind)


def _plain(tensor: torch.Tensor) -> bool:
    """A weight in a floating dtype of 16 bits or more (not FP8, not packed ints)."""
    return tensor.is_floating_point() and tensor.element_size() > 1


class NamedGateLinear(GateLinear):
    """A GateLinear (plain, a quantized checkpoint's tensors dequantized as they load)
    whose load errors name its HF module `hf_name`, and say how to avoid them."""

    def __init__(self, in_features: int, out_features: int, quant: QuantConfig | None,
                 hf_name: str) -> None:
        super().__init__(in_features, out_features, quant=quant)
        self.hf_name = hf_name

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int = 0) -> None:
        try:
            super().load_shard(param_name, loaded, shard)
        except ValueError as e:
            raise ValueError(
                f"{self.hf_name}.{param_name}: {e} (loraplex loads Gemma's routers and "
                "AltUp's small linears dequantized; a checkpoint whose format cannot hold "
                "them must leave them unquantized: its ignore / modules_to_not_convert "
                "list)") from e

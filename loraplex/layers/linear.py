"""Linear projections; packed ones (qkv, gate_up) load several HF weights into one matrix.

One matmul for q, k and v (or gate and up) instead of three; `output_sizes` records the
sub-projections so LoRA can keep one A/B pair per sub-projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.quantization import (
    AWQLinear,
    BnB4bitLinear,
    BnB8bitLinear,
    CompressedTensorsLinear,
    FP8Linear,
    GPTQLinear,
    NVFP4Linear,
    QuantConfig,
)


class Linear(nn.Module):
    """y = x W^T (+ b). `output_sizes` lists the packed sub-projections (one for a plain linear)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        """Copy one HF sub-projection (`shard` index into output_sizes) into its rows."""
        param = getattr(self, param_name)
        start = sum(self.output_sizes[:shard])
        size = self.output_sizes[shard]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit shard {shard} "
                             f"of {param_name} {tuple(param.shape)}")
        with torch.no_grad():
            param.data[start:start + size].copy_(loaded)


def make_linear(in_features: int, output_sizes: list[int], bias: bool = False,
                quant: QuantConfig | None = None, hf_names: tuple[str, ...] = ()) -> nn.Module:
    """A plain Linear, or the quantized one for `quant` unless the checkpoint left these
    HF modules (every sub-projection of a packed layer) unquantized. MXFP4 checkpoints
    (gpt-oss) quantize only the experts: their linears are plain."""
    if quant is None or quant.method == "mxfp4":
        return Linear(in_features, output_sizes, bias)
    skipped = [quant.skips(n) for n in hf_names]
    if any(skipped) and not all(skipped):
        raise ValueError(f"{quant.method}: {', '.join(hf_names)} are packed into one layer, but "
                         "modules_to_not_convert leaves only some of them unquantized")
    if skipped and all(skipped):
        return Linear(in_features, output_sizes, bias)
    cls = {"gptq": GPTQLinear, "awq": AWQLinear, "fp8": FP8Linear, "nvfp4": NVFP4Linear,
           "compressed-tensors": CompressedTensorsLinear,
           "bitsandbytes": BnB4bitLinear if quant.bits == 4 else BnB8bitLinear}[quant.method]
    return cls(in_features, output_sizes, bias, quant)

"""Linear layers over compressed-tensors' NVFP4 weights (`nvfp4-pack-quantized`:
llm-compressor's NVFP4A16 and NVFP4 schemes).

    W[o, i] = e2m1(q[o, i]) * s[o, i // 16] / G

`weight_packed` [out, in / 2] (uint8) holds two 4-bit e2m1 codes per byte, the even input
in the low nibble (bit 3 the sign, bits 0-2 an index into 0, 0.5, 1, 1.5, 2, 3, 4, 6);
`weight_scale` [out, in / 16] is FP8 e4m3, one per 16 inputs; `weight_global_scale` G
([1]) is each sub-projection's own (llm-compressor gives q/k/v, gate/up one; kept apart
here all the same). NVFP4 (W4A4) also stores `input_global_scale`: the activations are
quantized to NVFP4 first (float_activations.py; q/k/v's merged to the largest, as vLLM
does). The weights stay packed (4.5 bits each) and are dequantized in torch for each
matmul, on every device: no fused kernel yet.
"""

from __future__ import annotations

import torch

from loraplex.layers.quantization.bitsandbytes import _RowQuantLinear
from loraplex.layers.quantization.config import QuantConfig
from loraplex.layers.quantization.float_activations import FP8, check_groups
from loraplex.layers.quantization.linear import _frozen

GROUP = 16  # inputs per FP8 scale
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_TABLES: dict[torch.device, torch.Tensor] = {}


def e2m1_values(device: torch.device) -> torch.Tensor:
    """The fp32 value of each of the 16 codes (bit 3: the sign)."""
    table = _TABLES.get(device)
    if table is None:
        half = torch.tensor(E2M1, dtype=torch.float32)
        table = _TABLES[device] = torch.cat([half, -half]).to(device)
    return table


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> fp32 values [rows, cols], low nibble first."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return e2m1_values(packed.device)[codes.long()]


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in `dtype`: the codes times their group's scale / G ([out, 1]), in fp32
    as the package computes it."""
    out, n_in = packed.shape[0], packed.shape[1] * 2
    step = scale.float() / global_scale  # [out, in / 16]
    w = unpack_e2m1(packed).view(out, n_in // GROUP, GROUP) * step.unsqueeze(2)
    return w.view(out, n_in).to(dtype)


class NVFP4Linear(_RowQuantLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        if in_features % GROUP:
            raise ValueError(f"nvfp4: {in_features} inputs are not a multiple of its groups "
                             f"of {GROUP}")
        n = len(output_sizes)
        self.weight_packed = _frozen(self.out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight_scale", torch.zeros(
            self.out_features, in_features // GROUP, dtype=FP8))
        # each sub-projection's G (NaN: not loaded), one per row once loaded ([out, 1])
        self.register_buffer("weight_global_scale", torch.full((n,), float("nan")))
        self.activations = cfg.input_activations
        check_groups(self.activations, in_features, "nvfp4")
        self.register_buffer("input_global_scale", torch.full(
            (n if self.activations is not None else 0,), float("nan")))
        self._loaded: list[set[str]] = [set() for _ in output_sizes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = self.activations.fake_quantize(x, self.input_global_scale)
        return super().forward(x)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        rows = self._rows(shard)
        size = rows.stop - rows.start
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if param_name in ("weight_global_scale", "input_global_scale"):
            target = getattr(self, param_name)
            if shard >= target.numel():
                raise ValueError("nvfp4 checkpoint has an input_global_scale where its config "
                                 "says no activation quantization (NVFP4A16): the config "
                                 "does not match the weights")
            if loaded.numel() != 1:
                raise ValueError(f"nvfp4 {param_name} of shape {tuple(loaded.shape)}: one "
                                 "per tensor")
            target[shard] = loaded.reshape(()).float()
        elif param_name in ("weight_packed", "weight_scale"):
            want = (torch.uint8, (size, self.in_features // 2)) if param_name == "weight_packed" \
                else (FP8, (size, self.in_features // GROUP))
            if (loaded.dtype, tuple(loaded.shape)) != want:
                raise ValueError(f"nvfp4 {param_name} of shard {shard} is {loaded.dtype} "
                                 f"{tuple(loaded.shape)}, not {want[0]} {want[1]}")
            getattr(self, param_name).data[rows] = loaded.to(self.weight_scale.device)
        else:
            raise ValueError(f"checkpoint tensor {param_name!r} has no place in an nvfp4 layer "
                             "(weight_packed, weight_scale, weight_global_scale, "
                             "input_global_scale): the config does not match the weights")
        self._loaded[shard].add(param_name)

    def finish_loading(self) -> None:
        need = {"weight_packed", "weight_scale", "weight_global_scale"}
        if self.activations is not None:
            need.add("input_global_scale")
        for shard, have in enumerate(self._loaded):
            if not need <= have:
                raise ValueError(f"nvfp4: sub-projection {shard} of this layer is incomplete "
                                 f"in the checkpoint (found {sorted(have) or 'nothing'}; "
                                 f"{', '.join(sorted(need))} are needed)")
        self._spread_global_scales()

    def _spread_global_scales(self) -> None:
        """Each row's G ([out, 1]); one input_global_scale (the largest, as vLLM)."""
        sizes = torch.tensor(self.output_sizes, device=self.weight_global_scale.device)
        self.weight_global_scale = self.weight_global_scale.repeat_interleave(sizes)[:, None]
        if self.activations is not None:
            self.input_global_scale = self.input_global_scale.max().reshape(1)

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        return dequantize_nvfp4(self.weight_packed, self.weight_scale,
                                self.weight_global_scale, dtype)

    def fill_random(self, gen: torch.Generator) -> None:
        """Random codes; scales that make weights of about 0.02."""
        with torch.no_grad():
            self.weight_packed.copy_(torch.randint(0, 256, self.weight_packed.shape,
                                                   generator=gen).to(torch.uint8))
            self.weight_scale.copy_(torch.empty(self.weight_scale.shape).uniform_(
                1, 3, generator=gen).to(FP8))
            device, n = self.weight_scale.device, len(self.output_sizes)
            self.weight_global_scale = torch.full((n,), 200.0, device=device)
            if self.activations is not None:  # inputs up to about 4
                self.input_global_scale = torch.full((n,), 448 * 6 / 4, device=device)
            if self.bias is not None:
                self.bias.zero_()
        self._loaded = [{"weight_packed", "weight_scale", "weight_global_scale",
                         "input_global_scale"} for _ in self._loaded]
        self._spread_global_scales()

"""llm-compressor's weight-only int checkpoints (compressed-tensors W4A16 / W8A16),
converted while they load into GPTQ's in-memory layout: GPTQLinear's torch dequantize
path and its fused Triton kernel (triton_gemm.py) then serve them unchanged.

    W[o, i] = s[o, g(i)] * (q[o, i] - z[o, g(i)])     g(i) = i // group_size, or g_idx[i]

compressed-tensors stores q and z as signed integers plus 2^(bits - 1), packed 32 / bits
to an int32, lowest bits first (its pack_to_int32):
- `weight_packed` [out, in / pack]: consecutive inputs of one output row; GPTQ's qweight
  [in / pack, out] packs the same inputs the same way, so it is the transpose, bit for bit;
- `weight_zero_point` (asymmetric only) [out / pack, groups], packed along the outputs:
  GPTQ's qzeros [groups, out / pack] transposed. Symmetric weights store no zero: it is
  the offset 2^(bits - 1);
- `weight_scale` [out, groups] (one group per row for the channel strategy): scales
  transposed; `weight_g_idx` (act-order "group") is GPTQ's g_idx; `weight_shape` is
  checked. naive- / int-quantized checkpoints keep q as a signed int8 `weight` [out, in]
  (and an int8 zero point [out, groups]): offset and packed here.
"""

from __future__ import annotations

import torch

from loraplex.layers.quantization.config import QuantConfig
from loraplex.layers.quantization.int8_activations import merged_static
from loraplex.layers.quantization.linear import GPTQLinear

# checkpoint tensor -> the GPTQ parameter it becomes
PARAM_OF = {"weight_packed": "qweight", "weight": "qweight", "weight_scale": "scales",
            "weight_zero_point": "qzeros", "weight_g_idx": "g_idx"}


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values [rows, cols] -> int32 [rows, cols * bits / 32], along the
    last axis, lowest bits first."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], -1, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v << shifts).sum(-1)  # disjoint bits: the sum is the OR
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def midpoint_zeros(cfg: QuantConfig, groups: int, outputs: int) -> torch.Tensor:
    """A symmetric checkpoint's zeros, which it does not store: 2^(bits - 1), as qzeros."""
    return pack_int32(torch.full((groups, outputs), 1 << (cfg.bits - 1)), cfg.bits)


def check_weight_shape(cfg: QuantConfig, loaded: torch.Tensor, outputs: int,
                       inputs: int) -> None:
    if [int(v) for v in loaded.flatten()] != [outputs, inputs]:
        raise ValueError(f"{cfg.method} weight_shape {loaded.tolist()} does not fit "
                         f"({outputs}, {inputs})")


def to_gptq(cfg: QuantConfig, name: str, loaded: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor `name` in the layout of the GPTQ parameter it becomes
    (PARAM_OF[name]): transposed (naive int8 ones also offset and packed)."""
    bits, method, offset = cfg.bits, cfg.method, 1 << (cfg.bits - 1)
    if name in ("weight_packed", "weight_scale"):
        return loaded.t()
    if name == "weight":
        if loaded.dtype != torch.int8:
            raise ValueError(f"the checkpoint has a {loaded.dtype} weight where config.json's "
                             f"quantization_config ({method}, int{bits}) says int weights "
                             "(weight_packed, or an int8 weight) should be: the config does "
                             "not match the weights")
        return pack_int32(loaded.to(torch.int32) + offset, bits).t()
    if name == "weight_zero_point":
        if cfg.implicit_zero:
            raise ValueError(f"{method} checkpoint has a weight_zero_point where its config "
                             "says symmetric weights: the config does not match the weights")
        if loaded.dtype != torch.int32:  # naive: signed [out, groups], not packed
            return pack_int32((loaded.to(torch.int32) + offset).t(), bits)
        return loaded.t()
    if name == "weight_g_idx":
        return loaded
    raise ValueError(f"checkpoint tensor {name!r} has no place in a {method} int layer: "
                     "the config does not match the weights")


class CompressedTensorsLinear(GPTQLinear):
    """A GPTQ layer (zero_offset 0) that reads compressed-tensors' tensor names and layouts;
    sub-projections (q/k/v, gate/up) side by side on the output axis, as for GPTQ. With
    int8 activations (W8A8) its input is quantized first (int8_activations.py); static
    ones by the sub-projections' input_scale / input_zero_point, merged to one."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        if cfg.implicit_zero:  # nothing to load: a buffer holding the midpoint
            del self.qzeros
            self.register_buffer("qzeros", self._midpoint_zeros())
        self._loaded: list[set[str]] = [set() for _ in output_sizes]
        self.activations = cfg.input_activations
        # static activations: each sub-projection's (NaN: not loaded), then the merged one
        self.static_inputs = self.activations is not None and not self.activations.dynamic
        n = len(output_sizes) if self.static_inputs else 0
        self.register_buffer("input_scale", torch.full((n,), float("nan")))
        self.register_buffer("input_zero_point", torch.full(
            (n if self.static_inputs and not self.activations.symmetric else 0,), float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            zero = self.input_zero_point if self.input_zero_point.numel() else None
            x = self.activations.fake_quantize(x, self.input_scale, zero)
        return super().forward(x)

    def _midpoint_zeros(self) -> torch.Tensor:
        return midpoint_zeros(self.cfg, self.num_groups, self.out_features)

    def param_of(self, name: str) -> str:
        return PARAM_OF.get(name, name)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        """One sub-projection's compressed-tensors tensor, in GPTQ's layout."""
        if param_name == "weight_shape":
            return check_weight_shape(self.cfg, loaded, self.output_sizes[shard],
                                      self.in_features)
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if param_name in ("input_scale", "input_zero_point"):
            return self._input_quant_shard(param_name, loaded, shard)
        name, converted = self.param_of(param_name), to_gptq(self.cfg, param_name, loaded)
        try:
            super().load_shard(name, converted, shard)
        except ValueError as e:  # GPTQ's names and shapes: say which tensor it was
            raise ValueError(f"{self.cfg.method} {param_name} of shard {shard}, as GPTQ's "
                             f"{name} (transposed): {e}") from e
        self._loaded[shard].add(name)

    def _input_quant_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        target = getattr(self, param_name)
        if not self.static_inputs or shard >= target.numel():
            raise ValueError(f"{self.cfg.method} checkpoint has an {param_name} where its "
                             "config says no static (asymmetric, for a zero point) input "
                             "activation quantization: the config does not match the weights")
        if loaded.numel() != 1:
            raise ValueError(f"{self.cfg.method} {param_name} of shape {tuple(loaded.shape)}: "
                             "static input activations have one per tensor")
        target[shard] = loaded.reshape(()).float()
        self._loaded[shard].add(param_name)

    def finish_loading(self) -> None:
        if self.static_inputs:
            for name in ("input_scale", "input_zero_point"):
                if getattr(self, name).isnan().any():
                    raise ValueError(f"{self.cfg.method}: a sub-projection of this layer has "
                                     f"no {name}, which its static input activations need")
            scale, zero = merged_static(self.input_scale,
                                        self.input_zero_point if self.input_zero_point.numel()
                                        else None)
            self.input_scale = scale
            if zero is not None:
                self.input_zero_point = zero
        need = {"qweight", "scales"} | (set() if self.cfg.implicit_zero else {"qzeros"})
        for shard, have in enumerate(self._loaded):
            if not need <= have:
                raise ValueError(
                    f"{self.cfg.method}: sub-projection {shard} of this layer is incomplete "
                    f"in the checkpoint (found {sorted(have) or 'nothing'} after conversion: "
                    "weight_packed or an int8 weight, weight_scale, and weight_zero_point "
                    "for asymmetric weights are needed)")

    def fill_random(self, gen: torch.Generator) -> None:
        """GPTQ's random words; symmetric weights keep their midpoint zeros."""
        super().fill_random(gen)
        if self.cfg.implicit_zero:
            self.qzeros.copy_(self._midpoint_zeros())
        self._loaded = [{"qweight", "scales", "qzeros"} for _ in self._loaded]
        if self.static_inputs:  # inputs of about unit size: steps of 1/32
            device = self.input_scale.device
            self.input_scale = torch.full((1,), 1 / 32, device=device)
            self.input_zero_point = torch.zeros(self.input_zero_point.numel() and 1,
                                                device=device)

"""Linear layers over FP8 weights (float8_e4m3fn): the FP8 checkpoints of Qwen, DeepSeek
and transformers (`quant_method: fp8`), llm-compressor's (`compressed-tensors`, FP8
float-quantized), or a plain checkpoint quantized as it loads (`quantization="fp8"`).

    W[o, i] = q[o, i] * s           per tensor (one s per sub-projection: q, k, v apart)
    W[o, i] = q[o, i] * s[o]        per output channel
    W[o, i] = q[o, i] * s[o // bo, i // bi]    per block (128 x 128 in Qwen3 / DeepSeek:
                                               the checkpoints call it weight_scale_inv)

Every form is kept as a scale per row and block of `block_in` inputs ([out, blocks];
one block for tensor and channel scales), so the sub-projections of a packed layer stack
as rows whatever their own form. `fp8` checkpoints are weight-only (their static
`input_scale` / `activation_scale` is not used), as transformers runs them on the CPU
and vLLM on GPUs without FP8 compute. compressed-tensors' FP8 activations (FP8_DYNAMIC,
FP8, FP8_BLOCK) quantize the input first, as the package does (float_activations.py;
static scales of q/k/v, gate/up merged to the largest, as vLLM does). On CUDA the matmul
is a Triton kernel that dequantizes each tile in registers (triton_fp8.py); elsewhere the
weight is dequantized in torch first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.layers.quantization.bitsandbytes import _RowQuantLinear
from loraplex.layers.quantization.config import QuantConfig
from loraplex.layers.quantization.float_activations import check_groups
from loraplex.layers.quantization.int8_activations import merged_static
from loraplex.layers.quantization.linear import _frozen

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


@dataclass
class FP8Matrix:
    """One FP8 weight [out, in] and its scales, as the Triton kernel reads a layer (a
    mixture's expert projection)."""

    weight: torch.Tensor
    row_scale: torch.Tensor  # [out, blocks]
    block_in: int  # inputs per scale block
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain weight [out, in] -> (FP8 values, a scale per output row [out, 1])."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


_FP8_VALUES: dict[torch.device, torch.Tensor] = {}


def fp8_values(device: torch.device) -> torch.Tensor:
    """The fp32 value of each of the 256 FP8 bytes (the table the CPU path and the Triton
    kernel look bytes up in)."""
    table = _FP8_VALUES.get(device)
    if table is None:
        table = _FP8_VALUES[device] = torch.arange(256, dtype=torch.int32).to(
            torch.uint8).view(FP8).to(torch.float32).to(device)
    return table


def _fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """fp32 values of FP8 ones. torch on a CPU converts FP8 without vector instructions,
    slower than looking each byte up in a table of the 256 values: the table there."""
    if q.device.type != "cpu":
        return q.to(torch.float32)
    return fp8_values(q.device).index_select(0, q.view(torch.uint8).view(-1).int()).view(
        q.shape)


def scale_rows(scale: torch.Tensor, size: int, blocks: int, block_out: int,
               what: str) -> torch.Tensor:
    """A weight's scale in whichever form (one value; one per row; [rows / block_out,
    blocks] per block) as [size, blocks]: a scale per row and block of inputs."""
    if scale.numel() == 1:  # per tensor
        return scale.reshape(1, 1).expand(size, blocks)
    if scale.numel() == size and blocks == 1:  # per output channel
        return scale.reshape(size, 1)
    if block_out and scale.dim() == 2 and scale.shape == (-(-size // block_out), blocks):
        return scale.repeat_interleave(block_out, dim=0)[:size]
    raise ValueError(f"fp8 scale of shape {tuple(scale.shape)} fits neither a tensor, a "
                     f"channel nor a block scale ({block_out} rows x {blocks} blocks) of {what}")


def dequantize(q: torch.Tensor, row_scale: torch.Tensor, block_in: int,
               dtype: torch.dtype) -> torch.Tensor:
    """FP8 values [out, in] times their scales (row_scale [out, blocks] over blocks of
    block_in inputs), in `dtype`."""
    out, n_in = q.shape
    w, blocks = _fp8_to_float(q), row_scale.shape[1]
    if blocks == 1:
        w = w * row_scale
    elif n_in % block_in == 0:  # each scale over its block of inputs
        w = (w.view(out, blocks, block_in) * row_scale.unsqueeze(2)).view(out, n_in)
    else:  # a partial last block
        w = w * row_scale.repeat_interleave(block_in, dim=1)[:, :n_in]
    return w.to(dtype)


class FP8Linear(_RowQuantLinear):
    kernel_module = "loraplex.layers.quantization.triton_fp8"  # CUDA: fused dequantize-matmul

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        self.block_out, self.block_in = cfg.fp8_block or (0, in_features)
        self.weight = _frozen(self.out_features, in_features, dtype=FP8)
        self.register_buffer("row_scale", torch.zeros(
            self.out_features, -(-in_features // self.block_in), dtype=torch.float32))
        self._loaded = [set() for _ in output_sizes]  # per sub-projection: weight, scale
        self.activations = cfg.input_activations  # compressed-tensors' FP8 ones, or None
        check_groups(self.activations, in_features, "fp8")
        # static activations: each sub-projection's input_scale (NaN: not loaded), then one
        self.static_inputs = self.activations is not None and not self.activations.dynamic
        self.register_buffer("input_scale", torch.full(
            (len(output_sizes) if self.static_inputs else 0,), float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = self.activations.fake_quantize(x, self.input_scale)
        return super().forward(x)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if param_name in ("input_scale", "activation_scale"):
            return self._input_scale_shard(loaded, shard)
        rows = self._rows(shard)
        size = rows.stop - rows.start
        if param_name == "weight":
            if loaded.dtype != FP8:
                if self.cfg.prequantized or not loaded.is_floating_point():
                    raise ValueError(f"the checkpoint has a {loaded.dtype} weight where "
                                     "config.json's quantization_config (fp8) says FP8 "
                                     "(float8_e4m3fn) values should be: the config does not "
                                     "match the weights")
                loaded, scale = quantize_fp8(loaded)  # quantization="fp8" on a plain one
                self._set_scale(scale, shard, size)
            if loaded.shape != (size, self.in_features):
                raise ValueError(f"fp8 weight of shape {tuple(loaded.shape)} does not fit "
                                 f"shard {shard} ({size}, {self.in_features})")
            self.weight.data[rows] = loaded
            self._loaded[shard].add("weight")
        elif param_name in ("weight_scale", "weight_scale_inv"):
            self._set_scale(loaded.float(), shard, size)
        else:
            raise ValueError(f"checkpoint tensor {param_name!r} has no place in an fp8 layer: "
                             "the config does not match the weights")

    def _set_scale(self, scale: torch.Tensor, shard: int, size: int) -> None:
        """A sub-projection's scale, in whichever form, as its rows of row_scale."""
        rows = scale_rows(scale, size, self.row_scale.shape[1], self.block_out,
                          f"shard {shard} ({size} rows, {self.in_features} inputs)")
        self.row_scale[self._rows(shard)] = rows.to(self.row_scale.device)
        self._loaded[shard].add("scale")

    def _input_scale_shard(self, loaded: torch.Tensor, shard: int) -> None:
        """A static activation scale: used by compressed-tensors' static FP8 activations;
        an `fp8` checkpoint's (or a weight-only one's) is not, as transformers on the CPU."""
        if self.activations is None:
            return
        if not self.static_inputs:
            raise ValueError("fp8 checkpoint has an input_scale where its config says dynamic "
                             "input activations: the config does not match the weights")
        if loaded.numel() != 1:
            raise ValueError(f"fp8 input_scale of shape {tuple(loaded.shape)}: static input "
                             "activations have one per tensor")
        self.input_scale[shard] = loaded.reshape(()).float()

    def finish_loading(self) -> None:
        if self.static_inputs:
            if self.input_scale.isnan().any():
                raise ValueError("fp8: a sub-projection of this layer has no input_scale, "
                                 "which its static input activations need")
            self.input_scale = merged_static(self.input_scale, None)[0]
        for shard, have in enumerate(self._loaded):
            if have != {"weight", "scale"}:
                raise ValueError(f"fp8: sub-projection {shard} of this layer is incomplete in "
                                 f"the checkpoint (found {sorted(have) or 'nothing'}: the FP8 "
                                 "weight and its weight_scale / weight_scale_inv are needed)")

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        return dequantize(self.weight, self.row_scale, self.block_in, dtype)

    def fill_random(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            values = torch.empty(self.weight.shape).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
            self.weight.copy_(values.to(FP8))
            self.row_scale.copy_(torch.empty(self.row_scale.shape).uniform_(
                0.02 / FP8_MAX, 0.06 / FP8_MAX, generator=gen))
            if self.bias is not None:
                self.bias.zero_()
        self._loaded = [{"weight", "scale"} for _ in self._loaded]
        if self.static_inputs:  # inputs of about unit size
            self.input_scale = torch.full((1,), 1 / 32, device=self.input_scale.device)

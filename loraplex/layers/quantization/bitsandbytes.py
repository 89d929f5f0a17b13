"""Linear layers over bitsandbytes weights: transformers' `load_in_4bit` / `load_in_8bit`
checkpoints, or a plain checkpoint quantized to NF4 while it loads (the QLoRA base).

    4-bit:  W[o, i] = code[q[o, i]] * absmax[o, i // 64]     two q per byte, the even
                                                             input in the high nibble
    8-bit:  W[o, i] = q[o, i] * SCB[o] / 127                 LLM.int8's int8 rows

`code` is the 16-value NF4 or FP4 table (the checkpoint's `quant_map`). bitsandbytes cuts
the row-major weight [out, in] into blocks of 64 values; with `in` a multiple of 64 each
block lies in one row, so the sub-projections of a packed layer (q/k/v, gate/up) stack as
rows, as in layers/linear.py. Double quantization stores absmax itself as 8-bit codes in
blocks of 256, each with a float scale, plus one offset: undone while loading (absmax
kept in fp32: 1/16 byte per weight beside the 1/2 of the 4-bit values).

The torch path dequantizes the whole weight for each matmul: the CPU path, 8-bit's on
every device, and the reference for the fused 4-bit Triton kernel that CUDA tensors take
(triton_bnb.py). bitsandbytes itself is not needed to load or run them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplex.layers.quantization.codes4 import dequantize_codes4
from loraplex.layers.quantization.config import QuantConfig
from loraplex.layers.quantization.linear import QuantLinear, _frozen

# bitsandbytes' 4-bit tables (what its checkpoints store as quant_map); NF4 is sorted
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
            0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
FP4_CODE = (0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
            -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25)


def quantize_nf4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (q [out, in / 2] uint8, absmax [out, in / blocksize] fp32): each value
    scaled by its block's absmax and rounded to the nearest NF4 code, as bitsandbytes does."""
    out, d_in = w.shape
    blocks = w.float().view(out, d_in // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = (blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    code = torch.tensor(NF4_CODE, device=w.device)
    q = torch.bucketize(scaled.view(out, d_in), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2], absmax


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (fp32): NF4's or FP4's."""
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)


def fill_4bit_random(gen: torch.Generator, packed: torch.Tensor, absmax: torch.Tensor) -> None:
    """Dummy 4-bit weights (load_format="dummy"): random codes, absmax in [0.02, 0.06]."""
    with torch.no_grad():
        packed.copy_(torch.randint(0, 256, packed.shape, generator=gen, dtype=torch.uint8))
        absmax.copy_(torch.empty(absmax.shape).uniform_(0.02, 0.06, generator=gen))


@dataclass
class BnB4bitMatrix:
    """One 4-bit weight [out, in] as the torch path and the Triton kernel (triton_bnb.py)
    read it: a linear's, or one expert projection of a mixture (layers/quantized_experts.py)."""

    weight: torch.Tensor  # [out, in / 2] uint8, the even input in the high nibble
    absmax: torch.Tensor  # [out, in / blocksize] fp32
    code: torch.Tensor  # [16] fp32
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return 2 * self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        return dequantize_codes4(self.weight, self.absmax, self.code, dtype, high_first=True)


def _quant_state(blob: torch.Tensor) -> dict:
    """bitsandbytes' `quant_state.bitsandbytes__nf4` tensor: JSON in uint8s."""
    return json.loads(bytes(blob.flatten().tolist()).decode("utf-8"))


PARAMS4BIT_PIECES = ("weight, absmax, quant_map and quant_state are needed, plus nested_absmax "
                     "and nested_quant_map when double-quantized")


def unpack_4bit_state(pieces: dict[str, torch.Tensor], rows: int, in_features: int,
                      blocksize: int, what: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One Params4bit as transformers saves it (`weight` and its `weight.absmax`,
    `weight.quant_map`, `weight.quant_state.bitsandbytes__*`, and `weight.nested_*` when
    double-quantized) -> (packed [rows, in / 2], absmax [rows, in / blocksize] fp32, code);
    None until every piece has arrived (they come in any order). `what`: for errors."""
    state_key = next((k for k in pieces if k.startswith("weight.quant_state.")), None)
    needed = ["weight", "weight.absmax", "weight.quant_map"]
    if state_key is None or any(k not in pieces for k in needed):
        return None
    state = _quant_state(pieces[state_key])
    nested = "nested_offset" in state
    if nested and ("weight.nested_absmax" not in pieces
                   or "weight.nested_quant_map" not in pieces):
        return None
    if list(state.get("shape", [])) != [rows, in_features] or state.get("blocksize") != blocksize:
        raise ValueError(f"bitsandbytes 4-bit weight of shape {state.get('shape')} in blocks of "
                         f"{state.get('blocksize')} does not fit {what} ([{rows}, {in_features}] "
                         f"in blocks of {blocksize})")
    packed = pieces["weight"]
    packed = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    absmax = pieces["weight.absmax"]
    if nested:  # absmax = nested_code[a] * nested_absmax[block of 256] + offset
        nbs = int(state["nested_blocksize"])
        values = pieces["weight.nested_quant_map"].float()[absmax.flatten().long()]
        pad = -len(values) % nbs
        values = F.pad(values, (0, pad)).view(-1, nbs) * \
            pieces["weight.nested_absmax"].float()[:, None]
        absmax = values.flatten()[:absmax.numel()] + float(state["nested_offset"])
    if packed.numel() * 2 != rows * in_features or absmax.numel() * blocksize != \
            rows * in_features:
        raise ValueError(f"bitsandbytes 4-bit tensors of {what} hold {packed.numel() * 2} "
                         f"values and {absmax.numel()} blocks, not [{rows}, {in_features}]")
    return (packed.reshape(rows, in_features // 2),
            absmax.float().reshape(rows, in_features // blocksize),
            pieces["weight.quant_map"].float().flatten())


def adopt_code(code: torch.Tensor, loaded: torch.Tensor, first: bool, what: str) -> None:
    """Take a checkpoint's quant_map into `code`: the first piece of a layer sets it, the
    others must agree (one table per layer, as the kernel reads one)."""
    loaded = loaded.to(code.device)
    if not first and not torch.equal(loaded, code):
        raise ValueError(f"bitsandbytes 4-bit: the projections of {what} use different "
                         "quant_maps (nf4 and fp4?)")
    code.copy_(loaded)


class _RowQuantLinear(QuantLinear):
    """Weights kept as rows of W [out, in], bitsandbytes' layout: the matmul is
    F.linear over W dequantized (no transpose)."""

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize_rows(dtype).T

    def torch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_rows(x.dtype))


class BnB4bitLinear(_RowQuantLinear):
    kernel_module = "loraplex.layers.quantization.triton_bnb"  # CUDA: the fused kernel

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        bs = cfg.group_size
        if in_features % bs:
            raise ValueError(f"bitsandbytes 4-bit: {in_features} inputs are not a multiple of "
                             f"its block of {bs} values")
        self.weight = _frozen(self.out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("absmax", torch.zeros(self.out_features, in_features // bs,
                                                   dtype=torch.float32))
        self.register_buffer("code", code_table(cfg.quant_type))
        self._pending: list[dict[str, torch.Tensor]] = [{} for _ in output_sizes]
        self._loaded = [False] * len(output_sizes)  # per sub-projection

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if not (param_name == "weight" or param_name.startswith("weight.")) or \
                loaded.dtype == torch.int8:
            raise ValueError(f"checkpoint tensor {param_name!r} ({loaded.dtype}) has no place "
                             "in a bitsandbytes 4-bit layer (8-bit weights?): the config does "
                             "not match the weights")
        if param_name == "weight" and loaded.is_floating_point() and loaded.dim() == 2 \
                and loaded.shape[1] == self.in_features:
            if self.cfg.prequantized:
                raise ValueError("the checkpoint has a plain weight where config.json's "
                                 "quantization_config (bitsandbytes 4-bit) says packed "
                                 "4-bit values should be: the config does not match the weights")
            return self._quantize_shard(loaded, shard)
        self._pending[shard][param_name] = loaded
        self._try_unpack(shard)

    def _quantize_shard(self, w: torch.Tensor, shard: int) -> None:
        rows = self._rows(shard)
        if w.shape[0] != rows.stop - rows.start:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit shard {shard}")
        q, absmax = quantize_nf4(w.to(self.weight.device), self.cfg.group_size)
        self.weight.data[rows] = q
        self.absmax[rows] = absmax
        self._loaded[shard] = True

    def _try_unpack(self, shard: int) -> None:
        """Place a sub-projection once all its pieces have arrived (in any order)."""
        rows = self._rows(shard)
        unpacked = unpack_4bit_state(self._pending[shard], rows.stop - rows.start,
                                     self.in_features, self.cfg.group_size, f"shard {shard}")
        if unpacked is None:
            return
        packed, absmax, code = unpacked
        adopt_code(self.code, code, not any(self._loaded), "one packed layer")
        self.weight.data[rows] = packed
        self.absmax[rows] = absmax
        self._loaded[shard] = True
        self._pending[shard] = {}

    def finish_loading(self) -> None:
        for shard, done in enumerate(self._loaded):
            if not done:
                have = sorted(self._pending[shard])
                raise ValueError(f"bitsandbytes 4-bit: sub-projection {shard} of this layer "
                                 f"is incomplete in the checkpoint (found {have or 'nothing'}: "
                                 f"{PARAMS4BIT_PIECES})")

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        return dequantize_codes4(self.weight, self.absmax, self.code, dtype, high_first=True)

    def fill_random(self, gen: torch.Generator) -> None:
        fill_4bit_random(gen, self.weight, self.absmax)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
        self._loaded = [True] * len(self._loaded)


class BnB8bitLinear(_RowQuantLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        self.weight = _frozen(self.out_features, in_features, dtype=torch.int8)
        self.SCB = _frozen(self.out_features, dtype=torch.float32)  # each row's absmax

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if param_name == "weight_format":
            if int(loaded.flatten()[0]) != 0:  # 0 = "row"; the others are GPU tile layouts
                raise ValueError("bitsandbytes 8-bit weights in a tiled layout (weight_format "
                                 f"{int(loaded.flatten()[0])}) are not supported: save them "
                                 "with a recent transformers (row layout)")
            return
        if param_name == "weight" and loaded.dtype != torch.int8:
            what = "4-bit values" if loaded.dtype == torch.uint8 else "a plain weight"
            raise ValueError(f"the checkpoint has {what} ({loaded.dtype}) where config.json's "
                             "quantization_config (bitsandbytes 8-bit) says int8 rows should "
                             "be: the config does not match the weights")
        param = {"weight": self.weight, "SCB": self.SCB}.get(param_name)
        if param is None:
            raise ValueError(f"checkpoint tensor {param_name!r} has no place in a bitsandbytes "
                             "8-bit layer (4-bit weights?): the config does not match the "
                             "weights")
        target = param.data[self._rows(shard)]
        if loaded.shape != target.shape:
            raise ValueError(f"bitsandbytes 8-bit tensor {param_name} of shape "
                             f"{tuple(loaded.shape)} does not fit shard {shard} "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)

    def dequantize_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """W as [out, in] in `dtype`."""
        return self.weight.to(dtype) * (self.SCB / 127).to(dtype).unsqueeze(1)

    def fill_random(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.randint(-127, 128, self.weight.shape, generator=gen,
                                            dtype=torch.int8))
            self.SCB.copy_(torch.empty(self.SCB.shape).uniform_(0.02, 0.05, generator=gen))
            if self.bias is not None:
                self.bias.zero_()

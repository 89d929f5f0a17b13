"""Linear layers over GPTQ / AWQ packed weights: y = x W^T (+ b) with W dequantized.

    W[o, i] = scales[g(i), o] * (q[i, o] - zeros[g(i), o])        g(i) = i // group_size

`q` and `zeros` are small unsigned integers packed 32 // bits to an int32, lowest bits
first. GPTQ packs q along the inputs (qweight [in / pack, out]) and the zeros along the
outputs; its original format stores zero - 1, and act-order checkpoints give each input
its group in `g_idx`. AWQ packs both along the outputs, in the interleaved order of its
GEMM kernel. Packed sub-projections (q/k/v, gate/up) sit side by side on the output axis,
as in layers/linear.py, so LoRA sees the same `output_sizes` either way.

The torch path dequantizes the whole weight for each matmul: the CPU path, and the
reference for the fused Triton kernel that CUDA tensors take (triton_gemm.py). The
weights stay packed in memory (a quarter of fp16 at 4 bits); LoRA adds its delta to this
output in the activation dtype, as on a plain base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex import envs
from loraplex.backends import triton_kernels
from loraplex.layers.quantization.config import QuantConfig

# AWQ's GEMM layout: output column j of each group of 8 sits in nibble AWQ_NIBBLE[j]
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack(packed: torch.Tensor, bits: int, dim: int,
           nibble_of: tuple[int, ...] | None = None) -> torch.Tensor:
    """Each int32 -> its 32 // bits values, side by side along `dim` (int32 results)."""
    per = 32 // bits
    order = nibble_of if nibble_of is not None else range(per)
    shifts = torch.tensor([bits * k for k in order], dtype=torch.int32, device=packed.device)
    view = [1] * (packed.dim() + 1)
    view[dim + 1] = per
    values = (packed.unsqueeze(dim + 1) >> shifts.view(view)) & ((1 << bits) - 1)
    return values.flatten(dim, dim + 1)


def _frozen(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


@dataclass
class PackedIntWeight:
    """One GPTQ / AWQ weight as its tensors: what the torch dequantize and the Triton
    kernel (triton_gemm.py) read, for a linear layer or one expert's projection of a
    mixture (a view into its stacks, layers/quantized_experts.py)."""

    cfg: QuantConfig
    qweight: torch.Tensor  # GPTQ [in / per, out]; AWQ [in, out / per]
    qzeros: torch.Tensor  # [groups, out / per]
    scales: torch.Tensor  # [groups, out]
    g_idx: torch.Tensor | None = None  # GPTQ: each input's group
    act_order: bool = False  # GPTQ: g_idx is not i // group_size
    bias: torch.Tensor | None = None

    @property
    def awq(self) -> bool:
        return self.cfg.method == "awq"

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (1 if self.awq else self.cfg.pack_factor)

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T as [in, out] in `dtype`."""
        if self.awq:
            return self._awq_by_column_in_word(dtype).transpose(1, 2).reshape(
                self.in_features, self.out_features)
        return self._gptq_dequantize(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T in torch (no bias)."""
        if not self.awq:
            return x @ self._gptq_dequantize(x.dtype)
        # in the word-grouped column order, then the (small) output reordered: cheaper
        # than reordering the weight
        w = self._awq_by_column_in_word(x.dtype)
        y = x @ w.view(self.in_features, self.out_features)
        lead = x.shape[:-1]
        return y.view(*lead, 8, -1).transpose(-1, -2).reshape(*lead, self.out_features)

    def _gptq_dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scales.dtype not in (dtype, torch.float32) and dtype != torch.float32:
            # fp16 scales (GGUF's) under bf16: each weight rounded once, from fp32
            return self._gptq_dequantize(torch.float32).to(dtype)
        bits, per, gs = self.cfg.bits, self.cfg.pack_factor, self.cfg.group_size
        zeros = unpack(self.qzeros, bits, dim=1) + self.cfg.zero_offset  # [groups, out]
        if self.act_order or (gs != -1 and gs % per):
            q = unpack(self.qweight, bits, dim=0)  # [in, out]
            g = self.g_idx.long()
            return (q - zeros[g]).to(dtype) * self.scales[g].to(dtype)
        # one int32 row holds `per` consecutive inputs of one group: dequantize slot by
        # slot, each a contiguous pass (a broadcast unpack is slower on a CPU)
        g = self.g_idx[::per].long()  # each int32 row's group: that of its first input
        z, s = zeros[g].to(dtype), self.scales[g].to(dtype)  # [in / per, out]
        w = torch.empty(self.qweight.shape[0], per, self.out_features, dtype=dtype,
                        device=self.qweight.device)
        for j in range(per):
            w[:, j] = ((self.qweight >> (bits * j)) & ((1 << bits) - 1)).to(dtype).sub_(z).mul_(s)
        return w.view(self.in_features, self.out_features)

    def _awq_by_column_in_word(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T with its columns grouped by their place in the int32 word: [in, 8, out / 8],
        [i, j, c] = W[8c + j, i]. Each of the 8 writes is then one contiguous pass."""
        num_groups, cols = self.scales.shape[0], self.qweight.shape[1]
        q = self.qweight.view(num_groups, -1, cols)  # [groups, group_size, out / 8]
        by_word = (num_groups, cols, 8)  # a group's zeros / scales, word by word
        zeros = unpack(self.qzeros, 4, dim=1, nibble_of=AWQ_NIBBLE).to(dtype)
        z = zeros.view(by_word).transpose(1, 2).unsqueeze(1)  # [groups, 1, 8, out / 8]
        s = self.scales.to(dtype).view(by_word).transpose(1, 2).unsqueeze(1)
        w = torch.empty(*q.shape[:2], 8, cols, dtype=dtype, device=q.device)
        for j, nibble in enumerate(AWQ_NIBBLE):  # output columns 8c + j
            w[:, :, j] = ((q >> (4 * nibble)) & 15).to(dtype).sub_(z[:, :, j]).mul_(s[:, :, j])
        return w.view(self.in_features, 8, cols)


def fill_packed_random(gen: torch.Generator, qweight: torch.Tensor, qzeros: torch.Tensor,
                       scales: torch.Tensor) -> None:
    """Dummy GPTQ / AWQ weights (load_format="dummy"): random integers, small positive
    scales."""
    with torch.no_grad():
        for p in (qweight, qzeros):
            p.copy_(torch.randint(-2**31, 2**31, p.shape, generator=gen, dtype=torch.int64,
                                  device="cpu").to(torch.int32))
        scales.copy_(torch.empty(scales.shape).uniform_(0.002, 0.006, generator=gen))


PACKED_TENSORS = ("qweight", "qzeros", "scales")  # a GPTQ / AWQ projection's, besides g_idx


def columns_per_element(cfg: QuantConfig, name: str) -> int:
    """Output columns per element of a GPTQ / AWQ tensor `name` (on its last axis): a
    sub-projection's columns of it are its output columns over this."""
    return cfg.pack_factor if name == "qzeros" or (name == "qweight" and cfg.method == "awq") \
        else 1


def plain_groups(in_features: int, group_size: int) -> torch.Tensor:
    """GPTQ's g_idx without act-order: i // group_size."""
    i = torch.arange(in_features, dtype=torch.int32)
    return i // group_size if group_size != -1 else torch.zeros_like(i)


def checked_g_idx(loaded: torch.Tensor, in_features: int, num_groups: int) -> torch.Tensor:
    """A checkpoint's g_idx as int32, or a clear error."""
    loaded = loaded.to(torch.int32)
    if loaded.shape != (in_features,) or int(loaded.min()) < 0 \
            or int(loaded.max()) >= num_groups:
        raise ValueError(f"gptq: g_idx must hold {in_features} group indices below "
                         f"{num_groups}")
    return loaded


class QuantLinear(nn.Module):
    """What every quantized linear shares: shapes (`output_sizes` as in layers/linear.py,
    so LoRA sees the same layer), an optional bias, the matmul (the method's fused Triton
    kernel for CUDA tensors where it has one, else dequantize-then-matmul in torch) and
    the loading interface."""

    # module with quant_matmul(x, layer) for CUDA tensors (None: the torch path everywhere)
    kernel_module: str | None = None

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.out_features = sum(output_sizes)
        self.bias = _frozen(self.out_features) if bias else None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T as [in, out] in `dtype`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = (triton_kernels("LORAPLEX_QUANT_BACKEND", envs.LORAPLEX_QUANT_BACKEND,
                                  x.is_cuda, self.kernel_module)
                   if self.kernel_module else None)
        if kernels is not None:  # CUDA: dequantized tile by tile inside the matmul
            return kernels.quant_matmul(x, self)
        y = self.torch_matmul(x)
        return y + self.bias if self.bias is not None else y

    def torch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantize(x.dtype)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        """Copy one HF sub-projection's tensor (`shard` into output_sizes) into place."""
        raise NotImplementedError

    def param_of(self, name: str) -> str:
        """The parameter a checkpoint tensor `name` fills: its own name, unless the layer
        converts the checkpoint's layout into another (compressed_tensors.py)."""
        return name

    def finish_loading(self) -> None:
        """Raise if the checkpoint left part of this layer unset (after every tensor)."""

    def fill_random(self, gen: torch.Generator) -> None:
        """Dummy weights (load_format="dummy") of this layer's format."""
        raise NotImplementedError

    def _rows(self, shard: int) -> slice:
        """The output rows (columns of y) of sub-projection `shard`."""
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def _bias_shard(self, loaded: torch.Tensor, shard: int) -> None:
        if self.bias is None:
            if not loaded.any():
                return  # some quantizers save a zero bias for every linear
            raise ValueError(f"{self.cfg.method} checkpoint has a bias where the model has none")
        target = self.bias.data[self._rows(shard)]
        if loaded.shape != target.shape:
            raise ValueError(f"{self.cfg.method} bias of shape {tuple(loaded.shape)} does not "
                             f"fit shard {shard} ({target.shape[0]})")
        target.copy_(loaded)


class PackedIntLinear(QuantLinear):
    """GPTQ and AWQ: small unsigned integers packed into int32s, a scale and a zero per
    group of inputs and output column."""

    kernel_module = "loraplex.layers.quantization.triton_gemm"

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        if cfg.group_size != -1 and in_features % cfg.group_size:
            raise ValueError(f"{cfg.method}: {in_features} inputs are not a whole number of "
                             f"groups of {cfg.group_size}")
        if any(size % cfg.pack_factor for size in output_sizes):
            raise ValueError(f"{cfg.method}: output sizes {output_sizes} are not multiples of "
                             f"{cfg.pack_factor} (values per int32)")
        self.num_groups = cfg.num_groups(in_features)
        self.scales = _frozen(self.num_groups, self.out_features,
                              dtype=torch.float16 if cfg.fp16_scales else None)

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        """Copy one HF sub-projection's tensor into its columns (packed ones: its int32s)."""
        if param_name == "weight":
            raise ValueError(f"the checkpoint has a plain weight where config.json's "
                             f"quantization_config ({self.cfg.method}) says packed qweight, "
                             "qzeros and scales should be: the config does not match the weights")
        if param_name == "bias":
            return self._bias_shard(loaded, shard)
        if param_name not in PACKED_TENSORS:
            raise ValueError(f"{self.cfg.method} checkpoint tensor {param_name!r} has no place "
                             "in this layer")
        per = columns_per_element(self.cfg, param_name)
        rows = self._rows(shard)
        target = getattr(self, param_name).data.narrow(1, rows.start // per,
                                                       (rows.stop - rows.start) // per)
        if loaded.shape != target.shape:
            raise ValueError(f"{self.cfg.method} tensor {param_name} of shape "
                             f"{tuple(loaded.shape)} does not fit shard {shard} "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)

    def packed(self) -> PackedIntWeight:
        """This layer's tensors, as the dequantize and the Triton kernel read them."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.packed().dequantize(dtype)

    def torch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed().matmul(x)

    def fill_random(self, gen: torch.Generator) -> None:
        fill_packed_random(gen, self.qweight, self.qzeros, self.scales)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()


class GPTQLinear(PackedIntLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        per = cfg.pack_factor
        if in_features % per:
            raise ValueError(f"gptq: {in_features} inputs are not a multiple of {per}")
        self.qweight = _frozen(in_features // per, self.out_features, dtype=torch.int32)
        self.qzeros = _frozen(self.num_groups, self.out_features // per, dtype=torch.int32)
        # every sub-projection of a packed layer has its own g_idx: they must agree
        self.register_buffer("g_idx", plain_groups(in_features, cfg.group_size))
        self.act_order = False  # g_idx is not i // group_size
        self._g_idx_loaded = False

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int) -> None:
        if param_name != "g_idx":
            return super().load_shard(param_name, loaded, shard)
        loaded = checked_g_idx(loaded, self.in_features, self.num_groups)
        if self._g_idx_loaded and not torch.equal(self.g_idx.cpu(), loaded):
            raise ValueError("gptq: the sub-projections of one packed layer (q/k/v or "
                             "gate/up) have different g_idx (act-order permutations)")
        self.g_idx.copy_(loaded)
        self._g_idx_loaded = True
        self.act_order = not torch.equal(loaded, plain_groups(self.in_features,
                                                             self.cfg.group_size))

    def packed(self) -> PackedIntWeight:
        return PackedIntWeight(self.cfg, self.qweight, self.qzeros, self.scales, self.g_idx,
                               self.act_order, self.bias)


class AWQLinear(PackedIntLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool,
                 cfg: QuantConfig) -> None:
        super().__init__(in_features, output_sizes, bias, cfg)
        per = cfg.pack_factor
        self.qweight = _frozen(in_features, self.out_features // per, dtype=torch.int32)
        self.qzeros = _frozen(self.num_groups, self.out_features // per, dtype=torch.int32)

    def packed(self) -> PackedIntWeight:
        return PackedIntWeight(self.cfg, self.qweight, self.qzeros, self.scales, bias=self.bias)

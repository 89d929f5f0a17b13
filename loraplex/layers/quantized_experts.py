"""A quantized checkpoint's experts, kept in its format and stacked [E, ...] as
FusedExperts' (layers/experts.py): an expert a step routes tokens to goes through its
method's fused Triton kernel on CUDA, or is dequantized in torch (quantized_matmul).

    FP8FusedExperts         FP8 checkpoints (or quantization="fp8" on a plain one)
    MXFP4FusedExperts       gpt-oss's MXFP4 experts
    PackedIntFusedExperts   GPTQ / AWQ, and compressed-tensors int (as GPTQ)
    BnB4bitFusedExperts     bitsandbytes 4-bit (or quantization="bitsandbytes")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loraplex import envs
from loraplex.backends import triton_kernels
from loraplex.layers.activation import ClampedSwiGLU
from loraplex.layers.experts import EXPERT_PROJECTIONS, FusedExperts
from loraplex.layers.quantization import QuantConfig, mxfp4
from loraplex.layers.quantization.bitsandbytes import (
    PARAMS4BIT_PIECES,
    BnB4bitMatrix,
    adopt_code,
    code_table,
    fill_4bit_random,
    quantize_nf4,
    unpack_4bit_state,
)
from loraplex.layers.quantization.compressed_tensors import PARAM_OF as CT_PARAM_OF
from loraplex.layers.quantization.compressed_tensors import (
    check_weight_shape,
    midpoint_zeros,
)
from loraplex.layers.quantization.compressed_tensors import to_gptq as ct_to_gptq
from loraplex.layers.quantization.float_activations import check_groups
from loraplex.layers.quantization.fp8 import FP8, FP8_MAX, FP8Matrix, quantize_fp8
from loraplex.layers.quantization.fp8 import dequantize as fp8_dequantize
from loraplex.layers.quantization.fp8 import scale_rows as fp8_scale_rows
from loraplex.layers.quantization.linear import (
    PACKED_TENSORS,
    PackedIntWeight,
    checked_g_idx,
    columns_per_element,
    fill_packed_random,
    plain_groups,
)


def quantized_matmul(x: torch.Tensor, kernel_module: str, matrix: Any,
                      torch_matmul: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x @ W^T for one quantized expert projection: through its Triton kernel module
    (layers/quantization/`kernel_module`) on CUDA, else `torch_matmul()` (in torch, on
    the weight dequantized)."""
    kernels = triton_kernels("LORAPLEX_QUANT_BACKEND", envs.LORAPLEX_QUANT_BACKEND, x.is_cuda,
                             f"loraplex.layers.quantization.{kernel_module}")
    if kernels is not None:
        return kernels.quant_matmul(x, matrix)
    return torch_matmul()


class FP8FusedExperts(FusedExperts):
    """The experts of an FP8 checkpoint (quantization/fp8.py): w13 and w2 stay FP8 with a
    scale per row and block of inputs; an expert a step routes tokens to goes through
    the FP8 kernel on CUDA, or is dequantized in torch."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 cfg: QuantConfig) -> None:
        if cfg.input_activations is not None and not cfg.input_activations.dynamic:
            raise ValueError("compressed-tensors FP8 experts with static FP8 activations (the "
                             "FP8 scheme's input_scale) are not supported: their dynamic "
                             "ones (FP8_DYNAMIC, FP8_BLOCK) are")
        super().__init__(hidden_size, intermediate_size, num_experts, dtype=FP8)
        self.block_out, self.block_in = cfg.fp8_block or (0, 0)
        self.prequantized = cfg.prequantized  # False: quantization="fp8" on a plain one
        e, h, i = num_experts, hidden_size, intermediate_size
        self.register_buffer("w13_scale", torch.zeros(e, 2 * i, self._blocks(h)))
        self.register_buffer("w2_scale", torch.zeros(e, h, self._blocks(i)))
        self._scaled: set[tuple[int, str]] = set()  # (expert, projection) with its scale
        # compressed-tensors' dynamic FP8 activations: each projection's input rounded first
        self.activations = cfg.input_activations
        for size in (h, i):
            check_groups(self.activations, size, "fp8 experts")

    def _blocks(self, inputs: int) -> int:
        return -(-inputs // self.block_in) if self.block_in else 1

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """On CUDA the FP8 kernel (triton_fp8.py), else the expert dequantized in torch
        (dynamic FP8 activations: x quantized first)."""
        w, scale = getattr(self, which)[e], getattr(self, f"{which}_scale")[e]
        block_in = self.block_in or w.shape[1]  # unblocked: one block of all the inputs
        if self.activations is not None:
            x = self.activations.fake_quantize(x)
        return quantized_matmul(x, "triton_fp8", FP8Matrix(w, scale, block_in),
                                 lambda: x @ fp8_dequantize(w, scale, block_in, x.dtype).T)

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        if kind == "input_scale":  # weight-only, as the FP8 linears
            return self._place(name)[0]
        if kind == "weight" and tensor.dtype != FP8 and not self.prequantized:
            tensor, scale = quantize_fp8(tensor)
            self._set_scale(expert, name, scale)
        elif kind in ("weight_scale", "weight_scale_inv"):
            return self._set_scale(expert, name, tensor.float())
        return super().load_expert(expert, name, tensor, kind)

    def load_fused(self, name: str, tensor: torch.Tensor) -> str:
        """transformers 5's FP8 experts (its FP8Experts, saved fused): gate_up_proj
        [E, 2I, H] and down_proj [E, H, I] in FP8, our layout, and their scales
        (gate_up_proj_scale_inv...) per block of the fused rows, or unblocked one per
        tensor (gate_up: one per half, gate's and up's)."""
        weight = name.removesuffix("_scale_inv").removesuffix("_scale")
        param = {"gate_up_proj": "w13", "down_proj": "w2"}.get(weight)
        if param is None or self.fused_transposed or not self.prequantized \
                or self.ungated is not None:
            return super().load_fused(name, tensor)
        if name == weight:
            dst = getattr(self, param)
            if tensor.dtype != FP8 or tensor.shape != dst.shape:
                raise ValueError(f"fp8 experts {name} is {tensor.dtype} "
                                 f"{tuple(tensor.shape)}: the model expects FP8 "
                                 f"{tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(tensor)
            return param
        scales, i = getattr(self, f"{param}_scale"), self.intermediate_size
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"fp8 experts {name} has shape {tuple(tensor.shape)}, not one "
                             f"scale tensor per expert ({self.num_experts})")
        for e in range(self.num_experts):
            scale = tensor[e].float()
            if param == "w13" and not self.block_out and scale.numel() == 2:  # per half
                scale = scale.reshape(2, 1).repeat_interleave(i, dim=0)
            scales[e].copy_(fp8_scale_rows(scale, scales.shape[1], scales.shape[2],
                                           self.block_out, f"expert {e} {weight}"))
        leaves = self.w13_projections if param == "w13" else ("down",)
        self._scaled.update((e, leaf) for e in range(self.num_experts) for leaf in leaves)
        return param

    def _set_scale(self, expert: int, name: str, scale: torch.Tensor) -> str:
        param, rows = self._place(name)
        dst = getattr(self, f"{param}_scale")[expert, rows]
        dst.copy_(fp8_scale_rows(scale, dst.shape[0], dst.shape[1], self.block_out,
                                 f"expert {expert} {name}"))
        self._scaled.add((expert, EXPERT_PROJECTIONS[name]))
        return param

    def finish_loading(self) -> None:
        missing = [ep for ep in self.projections() if ep not in self._scaled]
        if missing:
            raise ValueError(f"fp8 experts: no weight_scale for {len(missing)} expert "
                             f"projections, e.g. expert {missing[0][0]}'s {missing[0][1]}")

    def fill_random(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            for w, scale in ((self.w13, self.w13_scale), (self.w2, self.w2_scale)):
                values = torch.empty(w.shape).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
                w.copy_(values.to(FP8))
                scale.copy_(torch.empty(scale.shape).uniform_(0.02 / FP8_MAX, 0.06 / FP8_MAX,
                                                              generator=gen))
        self._scaled = set(self.projections())


class MXFP4FusedExperts(FusedExperts):
    """gpt-oss's MXFP4 experts (quantization/mxfp4.py): w13 and w2 stay packed, two 4-bit
    values per byte, with a scale byte per row and 32 inputs; an expert a step routes
    tokens to goes through the MXFP4 kernel on CUDA, or is dequantized in torch. Its checkpoints' gate_up rows interleave gate and
    up, as the plain ones' columns do."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 gpt_oss: ClampedSwiGLU) -> None:
        e, h, i = num_experts, hidden_size, intermediate_size
        if h % mxfp4.BLOCK or i % mxfp4.BLOCK:
            raise ValueError(f"mxfp4 experts: hidden_size {h} and intermediate_size {i} must "
                             f"be multiples of its {mxfp4.BLOCK}-input blocks")
        super().__init__(h, i, e, dtype=torch.uint8, gpt_oss=gpt_oss, packing=2)
        self.register_buffer("w13_scale", torch.zeros(e, 2 * i, h // mxfp4.BLOCK,
                                                      dtype=torch.uint8))
        self.register_buffer("w2_scale", torch.zeros(e, h, i // mxfp4.BLOCK, dtype=torch.uint8))
        self._loaded: set[str] = set()

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """On CUDA the MXFP4 kernel (triton_mxfp4.py), else the expert dequantized in
        torch."""
        w, scale = getattr(self, which)[e], getattr(self, f"{which}_scale")[e]
        return quantized_matmul(x, "triton_mxfp4", mxfp4.MXFP4Matrix(w, scale),
                                 lambda: x @ mxfp4.dequantize(w, scale, x.dtype).T)

    def load_fused(self, name: str, tensor: torch.Tensor) -> str:
        """{gate_up,down}_proj_{blocks,scales} ([E, out, in / 32, 16], [E, out, in / 32]);
        the biases as in the plain checkpoints."""
        proj, _, kind = name.rpartition("_")
        target = {"gate_up_proj": "w13", "down_proj": "w2"}.get(proj)
        if target is None or kind not in ("blocks", "scales"):
            return super().load_fused(name, tensor)
        dst = getattr(self, target if kind == "blocks" else f"{target}_scale")
        if kind == "blocks":
            tensor = tensor.reshape(*tensor.shape[:2], -1)
        if tuple(tensor.shape) != tuple(dst.shape) or tensor.dtype != torch.uint8:
            raise ValueError(f"mxfp4 experts {name} has shape {tuple(tensor.shape)} "
                             f"({tensor.dtype}), the model expects {tuple(dst.shape)} uint8")
        if target == "w13":  # rows: gate's, then up's
            tensor = torch.cat([tensor[:, 0::2], tensor[:, 1::2]], dim=1)
        dst.data.copy_(tensor)
        self._loaded.add(name)
        return target

    def finish_loading(self) -> None:
        missing = {f"{p}_{k}" for p in ("gate_up_proj", "down_proj")
                   for k in ("blocks", "scales")} - self._loaded
        if missing:
            raise ValueError(f"mxfp4 experts: the checkpoint lacks {', '.join(sorted(missing))}")

    def fill_random(self, gen: torch.Generator) -> None:
        """Random bytes, scales around 2^-6 (values up to ~0.1); small biases."""
        with torch.no_grad():
            for w, scale in ((self.w13, self.w13_scale), (self.w2, self.w2_scale)):
                w.copy_(torch.randint(0, 256, w.shape, generator=gen, dtype=torch.uint8))
                scale.copy_(torch.randint(118, 122, scale.shape, generator=gen,
                                          dtype=torch.uint8))
            for bias in (self.b13, self.b2):
                bias.copy_(0.02 * torch.randn(bias.shape, generator=gen))
        self._loaded = {f"{p}_{k}" for p in ("gate_up_proj", "down_proj")
                        for k in ("blocks", "scales")}


class PackedIntFusedExperts(FusedExperts):
    """The experts of a GPTQ or AWQ checkpoint (Mixtral's, the Qwen MoE models'): each
    expert projection's qweight / qzeros / scales (and GPTQ's g_idx) stay packed as the
    checkpoint stores them (quantization/linear.py), stacked [E, ...]; gate's and up's
    columns side by side in w13, as a GPTQLinear packs them. An expert a step routes
    tokens to goes through the GPTQ / AWQ kernel on CUDA, or is dequantized in torch:
    PackedIntWeight, the linears' own code. Act-order: each expert has its own g_idx, one
    for gate and up (the same inputs, so their quantizer's permutation agrees).
    compressed-tensors' int experts (W4A16 / W8A16) are converted into GPTQ's layout as
    they load (quantization/compressed_tensors.py), as its linears are."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 cfg: QuantConfig) -> None:
        e, h, i = num_experts, hidden_size, intermediate_size
        if cfg.input_activations is not None:
            raise ValueError("compressed-tensors experts with int8 activations (W8A8) are not "
                             "supported: loraplex quantizes the activations of its Linears "
                             "only")
        per, gptq = cfg.pack_factor, cfg.method != "awq"  # compressed-tensors: as GPTQ
        for n in (h, i):
            if n % per or (cfg.group_size != -1 and n % cfg.group_size):
                raise ValueError(f"{cfg.method} experts: hidden_size {h} and the experts' "
                                 f"intermediate_size {i} must be multiples of {per} (values "
                                 f"per int32) and of group_size {cfg.group_size}")
        # qweight: GPTQ [in / per, out], AWQ [in, out / per], per expert
        w13_shape = (e, h // per, 2 * i) if gptq else (e, h, 2 * i // per)
        w2_shape = (e, i // per, h) if gptq else (e, i, h // per)
        super().__init__(h, i, e, dtype=torch.int32, shapes=(w13_shape, w2_shape))
        self.cfg = cfg
        for which, inputs, outputs in (("w13", h, 2 * i), ("w2", i, h)):
            groups = cfg.num_groups(inputs)
            zeros = (midpoint_zeros(cfg, groups, outputs).repeat(e, 1, 1) if cfg.implicit_zero
                     else torch.zeros(e, groups, outputs // per, dtype=torch.int32))
            self.register_buffer(f"{which}_qzeros", zeros)
            self.register_buffer(f"{which}_scales", torch.zeros(
                e, groups, outputs, dtype=torch.float16 if cfg.fp16_scales else None))
            if gptq:
                self.register_buffer(f"{which}_g_idx",
                                     plain_groups(inputs, cfg.group_size).repeat(e, 1))
        self.act_order = {"w13": False, "w2": False}  # some expert's g_idx is not plain
        self._loaded: set[tuple[int, str, str]] = set()  # (expert, projection, tensor)

    def packed(self, e: int, which: str) -> PackedIntWeight:
        """Expert e's "w13" or "w2" as the dequantize and the kernel read a linear's."""
        g_idx = getattr(self, f"{which}_g_idx", None)
        return PackedIntWeight(self.cfg, getattr(self, which)[e],
                               getattr(self, f"{which}_qzeros")[e],
                               getattr(self, f"{which}_scales")[e],
                               g_idx[e] if g_idx is not None else None, self.act_order[which])

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """On CUDA the GPTQ / AWQ kernel (triton_gemm.py), else dequantized in torch."""
        weight = self.packed(e, which)
        return quantized_matmul(x, "triton_gemm", weight, lambda: weight.matmul(x))

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        """One expert projection's qweight, qzeros, scales or g_idx into its columns
        (compressed-tensors': its weight_packed, ... as these)."""
        param, _ = self._place(name)
        what = f"{self.cfg.method} expert {expert} {name}.{kind}"
        if self.cfg.method == "compressed-tensors" and kind != "bias":
            if kind == "weight_shape":
                inputs = self.hidden_size if param == "w13" else self.intermediate_size
                outputs = self.hidden_size if param == "w2" else self.intermediate_size
                check_weight_shape(self.cfg, tensor, outputs, inputs)
                return param
            tensor, kind = ct_to_gptq(self.cfg, kind, tensor), CT_PARAM_OF.get(kind, kind)
        if kind == "weight":
            raise ValueError(f"{what}: a plain weight where config.json's quantization_config "
                             f"({self.cfg.method}) says packed qweight, qzeros and scales "
                             "should be: the config does not match the weights")
        if kind == "bias":
            if tensor.any():
                raise ValueError(f"{what}: the experts have no bias")
            return param  # some quantizers save a zero bias for every linear
        if kind == "g_idx" and self.cfg.method != "awq":
            return self._load_g_idx(expert, name, tensor)
        if kind not in PACKED_TENSORS:
            raise ValueError(f"{what} has no place in the {self.cfg.method} experts")
        dst = self._columns(expert, name, kind)
        if dst.shape != tensor.shape:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(dst.shape)}")
        dst.copy_(tensor)
        self._loaded.add((expert, EXPERT_PROJECTIONS[name], kind))
        return param

    def _columns(self, expert: int, name: str, kind: str) -> torch.Tensor:
        """Where expert `expert`'s `name`.`kind` goes: its output columns of the stack's
        tensor (w13: gate's first, then up's)."""
        param, rows = self._place(name)
        stack = getattr(self, param if kind == "qweight" else f"{param}_{kind}").data[expert]
        per = columns_per_element(self.cfg, kind)
        if rows.stop is None:  # down: all of w2's columns
            return stack
        return stack[:, rows.start // per:rows.stop // per]

    def _load_g_idx(self, expert: int, name: str, tensor: torch.Tensor) -> str:
        param, _ = self._place(name)
        dst = getattr(self, f"{param}_g_idx")[expert]
        loaded = checked_g_idx(tensor, dst.shape[0], self.cfg.num_groups(dst.shape[0]))
        proj = EXPERT_PROJECTIONS[name]
        partner = {"gate": "up", "up": "gate"}.get(proj)
        if (expert, partner, "g_idx") in self._loaded and not torch.equal(dst.cpu(), loaded):
            raise ValueError(f"gptq: expert {expert}'s gate and up projections have different "
                             "g_idx (act-order permutations)")
        dst.copy_(loaded)
        self._loaded.add((expert, proj, "g_idx"))
        if not torch.equal(loaded, plain_groups(dst.shape[0], self.cfg.group_size)):
            self.act_order[param] = True
        return param

    def finish_loading(self) -> None:
        needed = [k for k in PACKED_TENSORS if k != "qzeros" or not self.cfg.implicit_zero]
        missing = [(e, p, k) for e, p in self.projections() for k in needed
                   if (e, p, k) not in self._loaded]
        if missing:
            e, p, k = missing[0]
            raise ValueError(f"{self.cfg.method} experts: the checkpoint lacks {len(missing)} "
                             f"expert tensors, e.g. expert {e}'s {p} projection's {k}")

    def fill_random(self, gen: torch.Generator) -> None:
        for which in ("w13", "w2"):
            zeros = getattr(self, f"{which}_qzeros")
            kept = zeros.clone() if self.cfg.implicit_zero else None  # symmetric: midpoint
            fill_packed_random(gen, getattr(self, which), zeros,
                               getattr(self, f"{which}_scales"))
            if kept is not None:
                zeros.copy_(kept)
        self._loaded = {(e, p, k) for e, p in self.projections() for k in PACKED_TENSORS}


class BnB4bitFusedExperts(FusedExperts):
    """bitsandbytes 4-bit experts (quantization/bitsandbytes.py): `quantization=
    "bitsandbytes"` on a plain checkpoint NF4-quantizes each expert projection as it loads,
    as it does the linears; a checkpoint transformers 4 saved with load_in_4bit holds one
    Params4bit per expert projection, parsed as a linear's. w13 [E, 2I, H / 2] (gate's rows,
    then up's) and w2 [E, H, I / 2] keep two codes per byte, the even input in the high
    nibble, with an fp32 absmax per 64 inputs. An expert a step routes tokens to goes
    through the 4-bit kernel on CUDA (triton_bnb.py), or is dequantized in torch."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 cfg: QuantConfig) -> None:
        e, h, i, bs = num_experts, hidden_size, intermediate_size, cfg.group_size
        if h % bs or i % bs:
            raise ValueError(f"bitsandbytes 4-bit experts: hidden_size {h} and the experts' "
                             f"intermediate_size {i} must be multiples of its {bs}-input blocks")
        super().__init__(h, i, e, dtype=torch.uint8, packing=2)
        self.cfg = cfg
        self.register_buffer("w13_absmax", torch.zeros(e, 2 * i, h // bs))
        self.register_buffer("w2_absmax", torch.zeros(e, h, i // bs))
        self.register_buffer("code", code_table(cfg.quant_type))
        # (expert, projection) -> its Params4bit pieces so far (prequantized checkpoints)
        self._pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self._loaded: set[tuple[int, str]] = set()

    def matrix(self, e: int, which: str) -> BnB4bitMatrix:
        """Expert e's "w13" or "w2", as the torch path and the kernel read a linear's."""
        return BnB4bitMatrix(getattr(self, which)[e], getattr(self, f"{which}_absmax")[e],
                             self.code)

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """On CUDA the 4-bit kernel (triton_bnb.py), else dequantized in torch."""
        w = self.matrix(e, which)
        return quantized_matmul(x, "triton_bnb", w,
                                 lambda: F.linear(x, w.dequantize_rows(x.dtype)))

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        """A plain expert weight, quantized here (in-flight), or one piece of a Params4bit
        (weight, weight.absmax, ...), placed once all of its pieces have arrived."""
        param, rows = self._place(name)
        proj, what = EXPERT_PROJECTIONS[name], f"expert {expert} {name}"
        out, inputs = getattr(self, param)[expert, rows].shape
        inputs *= 2  # two per byte
        if kind == "weight" and tensor.is_floating_point():
            if self.cfg.prequantized:
                raise ValueError(
                    f"bitsandbytes 4-bit {what}.weight is a plain {tensor.dtype} weight where "
                    "config.json's quantization_config says 4-bit values should be (transformers "
                    "5 saves a mixture's experts unquantized): not supported; serve the original "
                    "checkpoint with quantization='bitsandbytes' (experts NF4 as they load)")
            if tuple(tensor.shape) != (out, inputs):
                raise ValueError(f"{what} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{(out, inputs)}")
            q, absmax = quantize_nf4(tensor.to(self.w13.device), self.cfg.group_size)
            return self._set(expert, name, q, absmax)
        if not (kind == "weight" or kind.startswith("weight.")) or tensor.dtype == torch.int8:
            raise ValueError(f"bitsandbytes 4-bit {what}.{kind} ({tensor.dtype}) has no place "
                             "in the 4-bit experts (8-bit weights? a bias?)")
        pending = self._pending.setdefault((expert, proj), {})
        pending[kind] = tensor
        unpacked = unpack_4bit_state(pending, out, inputs, self.cfg.group_size, what)
        if unpacked is None:
            return param
        q, absmax, code = unpacked
        adopt_code(self.code, code, not self._loaded, "the experts")
        del self._pending[expert, proj]
        return self._set(expert, name, q, absmax)

    def _set(self, expert: int, name: str, q: torch.Tensor, absmax: torch.Tensor) -> str:
        param, rows = self._place(name)
        getattr(self, param).data[expert, rows] = q
        getattr(self, f"{param}_absmax")[expert, rows] = absmax
        self._loaded.add((expert, EXPERT_PROJECTIONS[name]))
        return param

    def finish_loading(self) -> None:
        missing = [ep for ep in self.projections() if ep not in self._loaded]
        if missing:
            e, p = missing[0]
            have = sorted(self._pending.get((e, p), {}))
            raise ValueError(f"bitsandbytes 4-bit experts: the checkpoint lacks {len(missing)} "
                             f"expert projections, e.g. expert {e}'s {p} projection (found "
                             f"{have or 'nothing'}: {PARAMS4BIT_PIECES})")

    def fill_random(self, gen: torch.Generator) -> None:
        for which in ("w13", "w2"):
            fill_4bit_random(gen, getattr(self, which), getattr(self, f"{which}_absmax"))
        self._loaded = set(self.projections())

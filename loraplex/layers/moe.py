"""Sparse mixture of experts (Mixtral's block_sparse_moe, Qwen2-MoE's and Qwen3-MoE's mlp,
gpt-oss's mlp).

    p = softmax(W_g x)                      router over E experts
    top-k experts e of p, weights w_e = p_e / sum of the top-k p
                                            (Qwen3-MoE without norm_topk_prob: w_e = p_e)
    y = sum_e w_e * W2_e (silu(W1_e x) * W3_e x)

gpt-oss (`gpt_oss`, its experts' ClampedSwiGLU): the router has a bias and its weights
are the softmax of the top-k logits; each expert has biases and a clamped SwiGLU:
y = sum_e w_e * (W2_e act(W1_e x + b1_e, W3_e x + b3_e) + b2_e). Its checkpoints store
the experts fused and transposed: gate_up_proj [E, H, 2I] with gate and up interleaved
(columns 0::2, 1::2), down_proj [E, I, H], and the biases beside them.

Each expert is a SwiGLU MLP; its gate and up projections are stacked as w13 [E, 2I, H]
(W1 then W3; Qwen's gate_proj and up_proj) and its down projection as w2 [E, H, I], in
FusedExperts (transformers 5's `experts` module, with gate_up_proj and down_proj).
Qwen2-MoE adds a shared expert every token goes through, weighted by a sigmoid gate:
y += sigmoid(w_s . x) * shared_expert(x).

The (token, expert) pairs are sorted by expert on the device and the group sizes read
once per layer (one host sync), then one matmul pair runs per expert that has tokens; so
the decode step of a MoE model runs without CUDA graphs. Under LoRA the pairs are also
sorted by adapter slot within each expert (lora/experts.py adds each slot's delta). An
FP8 checkpoint's experts stay FP8 (FP8FusedExperts), read through the FP8 kernel or
dequantized when they have tokens; gpt-oss's MXFP4 experts alike (MXFP4FusedExperts), a
GPTQ or AWQ checkpoint's packed experts (PackedIntFusedExperts) and bitsandbytes' 4-bit
ones (BnB4bitFusedExperts). The routers stay plain (GateLinear): a checkpoint that
quantized them is dequantized while it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loraplex import envs
from loraplex.backends import triton_kernels
from loraplex.layers.activation import ClampedSwiGLU
from loraplex.layers.linear import Linear, make_linear
from loraplex.layers.quantization import QuantConfig, QuantLinear, mxfp4
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

# an expert projection's name in checkpoints and adapters (Mixtral's, Qwen's) -> which one
EXPERT_PROJECTIONS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up",
                      "w2": "down", "down_proj": "down"}


@dataclass
class ExpertGroup:
    """One expert's share of the step: pairs start:end of the sorted order."""

    expert: int
    start: int
    end: int
    # (slot, start, end) runs of one adapter slot within start:end (-1 = no adapter)
    slot_runs: list[tuple[int, int, int]]


def group_by_expert(experts: torch.Tensor, num_experts: int,
                    token_slots: torch.Tensor | None = None, num_slots: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, list[ExpertGroup]]:
    """Sort the (token, k) pairs of `experts` [T, k] by expert, then by slot.

    Returns (token row of each sorted pair, its flat index into [T * k], the groups).
    The group sizes are the only values read back to the host."""
    tokens, k = experts.shape
    key = experts.reshape(-1).long()
    width = 1  # keys per expert: one, or one per slot and one for no adapter
    if token_slots is not None:  # slot -1 .. num_slots - 1 -> 0 .. num_slots
        width = num_slots + 1
        key = key * width + token_slots.long().unsqueeze(1).expand(tokens, k).reshape(-1) + 1
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts * width).tolist()  # the host sync
    groups: list[ExpertGroup] = []
    end = 0
    for key_of_run, n in [(i, n) for i, n in enumerate(counts) if n]:  # the sorted order
        e, s = divmod(key_of_run, width)
        if not groups or groups[-1].expert != e:
            groups.append(ExpertGroup(e, end, end, []))
        groups[-1].slot_runs.append((s - 1, end, end + n))
        end = groups[-1].end = end + n
    return order // k, order, groups


class ExpertsLoRA(Protocol):
    """What FusedExperts asks of a LoRA on the experts (lora/experts.py)."""

    def add_gate_up(self, h: torch.Tensor, x: torch.Tensor, group: ExpertGroup) -> None: ...

    def add_down(self, y: torch.Tensor, a: torch.Tensor, group: ExpertGroup) -> None: ...


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The experts' activation but gpt-oss's: silu(gate) * up."""
    return F.silu(gate) * up


Shapes = tuple[tuple[int, ...], tuple[int, ...]]


class FusedExperts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 dtype: torch.dtype | None = None, gpt_oss: ClampedSwiGLU | None = None,
                 packing: int = 1, shapes: Shapes | None = None) -> None:
        """`dtype`: a quantized subclass's storage; `packing`: its inputs per element;
        `shapes`: w13's and w2's where its layout is not [E, out, in / packing]."""
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts = num_experts
        e, h, i = num_experts, hidden_size, intermediate_size
        w13_shape, w2_shape = shapes or ((e, 2 * i, h // packing), (e, h, i // packing))
        self.w13 = nn.Parameter(torch.empty(w13_shape, dtype=dtype), requires_grad=dtype is None)
        self.w2 = nn.Parameter(torch.empty(w2_shape, dtype=dtype), requires_grad=dtype is None)
        self.act = gpt_oss or swiglu
        # gpt-oss: biases b13 (gate's then up's) [E, 2I] and b2 [E, H]; its checkpoints'
        # and adapters' gate_up columns interleave gate and up
        self.interleaved = gpt_oss is not None
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) \
            if gpt_oss else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size)) if gpt_oss else None

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """x times expert e's `which` transposed: "w13" (gate and up, [n, 2I]) or "w2"
        (down, [n, H])."""
        return x @ getattr(self, which)[e].T

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                token_slots: torch.Tensor | None = None, num_slots: int = 0,
                lora: ExpertsLoRA | None = None) -> torch.Tensor:
        """sum over each token's top-k experts e of weight * expert_e(x) [T, H]."""
        rows, pairs, groups = group_by_expert(experts, self.num_experts, token_slots,
                                              num_slots)
        pair_weights = weights.reshape(-1)[pairs].unsqueeze(1)
        out = torch.zeros_like(x)
        for g in groups:
            e, sel = g.expert, rows[g.start:g.end]
            xe = x[sel]
            h = self.project(e, "w13", xe)  # [n, 2I]: W1 x, W3 x
            if self.b13 is not None:
                h += self.b13[e]
            if lora is not None:
                lora.add_gate_up(h, xe, g)  # += B1 A1 x, B3 A3 x (each row its slot's)
            a = self.act(*h.chunk(2, dim=-1))
            y = self.project(e, "w2", a)
            if self.b2 is not None:
                y += self.b2[e]
            if lora is not None:
                lora.add_down(y, a, g)  # += B2 A2 a
            out.index_add_(0, sel, y * pair_weights[g.start:g.end])
        return out

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        """An HF checkpoint's experts.{expert}.{name}.{kind} (Mixtral's w1 / w3 / w2, Qwen's
        gate_proj / up_proj / down_proj) into the stacks; returns the parameter it went
        into."""
        param, rows = self._place(name)
        if kind != "weight":
            raise ValueError(f"unexpected expert tensor {name}.{kind} (a quantized "
                             "checkpoint whose config does not say so?)")
        dst = getattr(self, param).data[expert, rows]
        if dst.shape != tensor.shape:
            raise ValueError(f"expert {expert} {name} has shape {tuple(tensor.shape)}, the "
                             f"model expects {tuple(dst.shape)}")
        if (tensor.dtype == FP8) != (dst.dtype == FP8):
            raise ValueError(f"expert {expert} {name} is {tensor.dtype} where the model keeps "
                             f"{dst.dtype}: the checkpoint's quantization_config does not "
                             "match its weights")
        dst.copy_(tensor)
        return param

    def load_fused(self, name: str, tensor: torch.Tensor) -> str:
        """gpt-oss's fused experts: gate_up_proj [E, H, 2I] (gate, up interleaved),
        down_proj [E, I, H] and their biases; returns the parameter it went into."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"gate_up_proj": ("w13", (e, h, 2 * i)), "down_proj": ("w2", (e, i, h)),
                  "gate_up_proj_bias": ("b13", (e, 2 * i)), "down_proj_bias": ("b2", (e, h))}
        if not self.interleaved or name not in shapes:
            raise ValueError(f"unexpected experts tensor {name!r} in the checkpoint")
        param, shape = shapes[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"experts {name} has shape {tuple(tensor.shape)}, the model "
                             f"expects {shape}")
        if name.startswith("gate_up"):  # columns: gate's, then up's
            tensor = torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1)
        if tensor.dim() == 3:  # [E, in, out] -> [E, out, in]
            tensor = tensor.transpose(1, 2)
        with torch.no_grad():
            getattr(self, param).copy_(tensor)
        return param

    def _place(self, name: str) -> tuple[str, slice]:
        """(stack, its rows) of an expert projection's name."""
        proj = EXPERT_PROJECTIONS.get(name)
        if proj is None:
            raise ValueError(f"unexpected expert weight {name!r} (expected w1, w2, w3 or "
                             "gate_proj, up_proj, down_proj)")
        i = self.intermediate_size
        return {"gate": ("w13", slice(0, i)), "up": ("w13", slice(i, 2 * i)),
                "down": ("w2", slice(None))}[proj]

    def finish_loading(self) -> None:
        """Raise if the checkpoint left part of the experts unset (after every tensor)."""

    def projections(self) -> list[tuple[int, str]]:
        """Every (expert, projection): what a quantized subclass's loading must cover."""
        return [(e, p) for e in range(self.num_experts) for p in ("gate", "up", "down")]


def _quantized_matmul(x: torch.Tensor, kernel_module: str, matrix: Any,
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
        super().__init__(hidden_size, intermediate_size, num_experts, dtype=FP8)
        self.block_out, self.block_in = cfg.fp8_block or (0, 0)
        self.prequantized = cfg.prequantized  # False: quantization="fp8" on a plain one
        e, h, i = num_experts, hidden_size, intermediate_size
        self.register_buffer("w13_scale", torch.zeros(e, 2 * i, self._blocks(h)))
        self.register_buffer("w2_scale", torch.zeros(e, h, self._blocks(i)))
        self._scaled: set[tuple[int, str]] = set()  # (expert, projection) with its scale

    def _blocks(self, inputs: int) -> int:
        return -(-inputs // self.block_in) if self.block_in else 1

    def project(self, e: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """On CUDA the FP8 kernel (triton_fp8.py), else the expert dequantized in torch."""
        w, scale = getattr(self, which)[e], getattr(self, f"{which}_scale")[e]
        block_in = self.block_in or w.shape[1]  # unblocked: one block of all the inputs
        return _quantized_matmul(x, "triton_fp8", FP8Matrix(w, scale, block_in),
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
        return _quantized_matmul(x, "triton_mxfp4", mxfp4.MXFP4Matrix(w, scale),
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
            self.register_buffer(f"{which}_scales", torch.zeros(e, groups, outputs))
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
        return _quantized_matmul(x, "triton_gemm", weight, lambda: weight.matmul(x))

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
        return _quantized_matmul(x, "triton_bnb", w,
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


class GateLinear(Linear):
    """A mixture's router (and Qwen2-MoE's shared_expert_gate), always plain: [E, H] is
    small, and routing on the exact weights keeps the top-k choice what the quantizer saw.
    Some checkpoints quantize it anyway (GPTQModel's / AutoRound's Qwen3-MoE pack mlp.gate;
    transformers 4's load_in_4bit quantizes every nn.Linear): their tensors (qweight,
    weight.absmax, ...) gather in a linear of the checkpoint's method, built on the first of
    them, which finish_loading dequantizes into the plain weight. Plain tensors load as
    they are, so checkpoints that leave the router plain need not say so."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant: QuantConfig | None = None) -> None:
        super().__init__(in_features, [out_features], bias)
        self.quant = quant
        self._quantized: QuantLinear | None = None  # while loading a quantized checkpoint's

    def load_shard(self, param_name: str, loaded: torch.Tensor, shard: int = 0) -> None:
        plain = loaded.is_floating_point() and loaded.element_size() > 1  # not FP8 / ints
        if param_name == "bias" and self.bias is None:
            if loaded.any():
                raise ValueError("the checkpoint has a bias for a router that has none")
            return  # some quantizers save a zero bias for every linear
        if param_name in ("weight", "bias") and plain:
            return super().load_shard(param_name, loaded, shard)
        if self._quantized is None:
            layer = make_linear(self.in_features, self.output_sizes, False, self.quant)
            if not isinstance(layer, QuantLinear):
                raise ValueError(f"router tensor {param_name} ({loaded.dtype}) is quantized, "
                                 "but the checkpoint's config names no quantization for it")
            self._quantized = layer.to(self.weight.device)
        self._quantized.load_shard(param_name, loaded, 0)

    def param_of(self, name: str) -> str:
        """The parameter a checkpoint tensor fills: the weight, unless it is the bias."""
        return "bias" if name == "bias" else "weight"

    def finish_loading(self) -> None:
        """Dequantize a quantized checkpoint's router into the plain weight."""
        if self._quantized is None:
            return
        self._quantized.finish_loading()
        with torch.no_grad():
            self.weight.copy_(self._quantized.dequantize(torch.float32).T)
        self._quantized = None


def experts_quantized(quant: QuantConfig, hf_names: tuple[str, ...]) -> bool:
    """Are the experts (their HF modules `hf_names`) quantized, or all left plain by
    modules_to_not_convert? Some of them plain is refused."""
    skipped = [quant.skips(n) for n in hf_names]
    if any(skipped) and not all(skipped):
        raise ValueError(f"{quant.method}: modules_to_not_convert leaves only some of a "
                         f"mixture's experts unquantized (e.g. {hf_names[skipped.index(True)]}, "
                         f"not {hf_names[skipped.index(False)]})")
    return not (skipped and all(skipped))


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 top_k: int, normalize: bool = True, shared_expert: nn.Module | None = None,
                 quant: QuantConfig | None = None, gpt_oss: ClampedSwiGLU | None = None,
                 expert_names: tuple[str, ...] = ()) -> None:
        """`quant`: an FP8, GPTQ, AWQ or bitsandbytes 4-bit checkpoint's or gpt-oss's MXFP4
        one (its experts; the routers stay plain, GateLinear); `expert_names`: the experts'
        HF modules, which modules_to_not_convert may leave plain."""
        super().__init__()
        self.shared_expert = shared_expert
        self.shared_expert_gate = GateLinear(hidden_size, 1, quant=quant) \
            if shared_expert else None
        self.top_k, self.normalize = top_k, normalize
        self.gpt_oss = gpt_oss is not None
        # the router, under its checkpoints' name: Mixtral's and Qwen's "gate", gpt-oss's
        # "router" (with a bias)
        self.router_name = "router" if gpt_oss else "gate"
        setattr(self, self.router_name,
                GateLinear(hidden_size, num_experts, bias=gpt_oss is not None, quant=quant))
        packed_int = ("gptq", "awq", "compressed-tensors")
        if quant is not None and quant.method in (*packed_int, "bitsandbytes") \
                and not experts_quantized(quant, expert_names):
            quant = None
        if quant is not None and quant.method == "mxfp4":
            self.experts = MXFP4FusedExperts(hidden_size, intermediate_size, num_experts,
                                             gpt_oss)
        elif quant is not None and quant.method == "bitsandbytes":
            self.experts = BnB4bitFusedExperts(hidden_size, intermediate_size, num_experts,
                                               quant)
        elif quant is not None and quant.method in packed_int:
            self.experts = PackedIntFusedExperts(hidden_size, intermediate_size, num_experts,
                                                 quant)
        elif quant is not None:
            self.experts = FP8FusedExperts(hidden_size, intermediate_size, num_experts, quant)
        else:
            self.experts = FusedExperts(hidden_size, intermediate_size, num_experts,
                                        gpt_oss=gpt_oss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = getattr(self, self.router_name)(x)
        if self.gpt_oss:  # the softmax of the top-k logits
            top, experts = logits.topk(self.top_k, dim=-1)
            weights = F.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, weights.to(x.dtype), experts)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

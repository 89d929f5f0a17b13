"""A mixture's experts, stacked (layers/moe.py routes tokens to them).

Each expert is a SwiGLU MLP; its gate and up projections are stacked as w13 [E, 2I, H]
(W1 then W3; Qwen's gate_proj and up_proj) and its down projection as w2 [E, H, I], in
FusedExperts (transformers 5's `experts` module, with gate_up_proj and down_proj).
gpt-oss's experts have biases and a clamped SwiGLU, and its checkpoints store them fused
and transposed: gate_up_proj [E, H, 2I] with gate and up interleaved (columns 0::2,
1::2), down_proj [E, I, H], the biases beside them (FusedExperts.load_fused).
Nemotron-H's (`ungated`: its squared ReLU) have no gate: w13 holds up alone [E, I, H],
and y = W2_e act(W1_e x); its checkpoints hold them per expert (up_proj, down_proj), or
fused as transformers 5 saves them, up_proj [E, I, H] and down_proj [E, H, I] (ours).
Llama 4's (`llama4`) are stored fused and transposed too, gate's columns then up's; its
router weight multiplies each token's input to the expert instead of the output.
Qwen3-VL-MoE's (`fused`) are fused, gate's columns then up's, in either of two layouts:
transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H]) as the hub's files hold them,
or [E, 2I, H] / [E, H, I] as transformers 5 saves them (its loader transposes a tensor
only when it is not already the module's shape, so its own save skips the transpose).

The (token, expert) pairs are sorted by expert on the device and the group sizes read
once per layer (one host sync), then one matmul pair runs per expert that has tokens; so
the decode step of a MoE model runs without CUDA graphs. Under LoRA the pairs are also
sorted by adapter slot within each expert (lora/experts.py adds each slot's delta).
A quantized checkpoint's experts keep its format: layers/quantized_experts.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.activation import ClampedSwiGLU
from loraplex.layers.quantization.fp8 import FP8

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
# what quantizers save beside a fused experts tensor (transformers 5's FP8 `_scale_inv`,
# gpt-oss's MXFP4 `_blocks` / `_scales`, ...)
QUANTIZED_FUSED_SUFFIXES = ("_scale_inv", "_scale", "_scales", "_blocks", "_zero_point",
                            "_zeros", "_packed", "_absmax", "_quant_map", "_g_idx")


def _quantized_dtype(tensor: torch.Tensor) -> bool:
    """A quantized tensor's storage (FP8, packed ints, bitsandbytes' uint8), not a plain
    weight's."""
    return not tensor.is_floating_point() or tensor.dtype.itemsize == 1


class FusedExperts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int,
                 dtype: torch.dtype | None = None, gpt_oss: ClampedSwiGLU | None = None,
                 packing: int = 1, shapes: Shapes | None = None, llama4: bool = False,
                 fused: bool = False,
                 ungated: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                 ) -> None:
        """`dtype`: a quantized subclass's storage; `packing`: its inputs per element;
        `shapes`: w13's and w2's where its layout is not [E, out, in / packing];
        `llama4`: Llama 4's experts (weights on the inputs, its checkpoints' layout);
        `fused`: Qwen3-VL-MoE's checkpoints (fused, transposed or not: load_fused);
        `ungated`: the activation of experts without a gate (Nemotron-H's); `act`: a
        gated one other than SwiGLU, act(gate, up) (Gemma 4's GeGLU)."""
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts = num_experts
        # the projections w13 stacks: gate and up, or up alone
        self.w13_projections = ("up",) if ungated is not None else ("gate", "up")
        e, h, i = num_experts, hidden_size, intermediate_size
        w13_rows = len(self.w13_projections) * i
        w13_shape, w2_shape = shapes or ((e, w13_rows, h // packing), (e, h, i // packing))
        self.w13 = nn.Parameter(torch.empty(w13_shape, dtype=dtype), requires_grad=dtype is None)
        self.w2 = nn.Parameter(torch.empty(w2_shape, dtype=dtype), requires_grad=dtype is None)
        self.act = gpt_oss or act or swiglu
        self.ungated = ungated
        # gpt-oss: biases b13 (gate's then up's) [E, 2I] and b2 [E, H]; its checkpoints'
        # and adapters' gate_up columns interleave gate and up
        self.interleaved = gpt_oss is not None
        # the checkpoint's gate_up_proj [E, H, 2I] and down_proj [E, I, H] (load_fused)
        self.fused_transposed = gpt_oss is not None or llama4 or fused
        # ... or [E, 2I, H] and [E, H, I], our own layout (Qwen3-VL-MoE saved by
        # transformers 5)
        self.fused_untransposed = fused
        # Llama 4: expert_e(w * x) rather than w * expert_e(x)
        self.scale_inputs = llama4
        # what PEFT's target_parameters sees (lora/expert_weights.py `peft_swapped`): the
        # parameters as transformers holds them, [E, in, out] (gpt-oss, Llama 4) or
        # [E, out, in]; and whether transformers 5 marks them `is_transposed` (gpt-oss)
        self.peft_in_out = gpt_oss is not None or llama4
        self.peft_is_transposed = gpt_oss is not None
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
            if self.scale_inputs:
                xe = xe * pair_weights[g.start:g.end]
            h = self.project(e, "w13", xe)  # [n, 2I]: W1 x, W3 x
            if self.b13 is not None:
                h += self.b13[e]
            if lora is not None:
                lora.add_gate_up(h, xe, g)  # += B1 A1 x, B3 A3 x (each row its slot's)
            a = self.ungated(h) if self.ungated is not None else self.act(*h.chunk(2, dim=-1))
            y = self.project(e, "w2", a)
            if self.b2 is not None:
                y += self.b2[e]
            if lora is not None:
                lora.add_down(y, a, g)  # += B2 A2 a
            out.index_add_(0, sel, y if self.scale_inputs else y * pair_weights[g.start:g.end])
        return out

    def load_expert(self, expert: int, name: str, tensor: torch.Tensor,
                    kind: str = "weight") -> str:
        """An HF checkpoint's experts.{expert}.{name}.{kind} (Mixtral's w1 / w3 / w2, Qwen's
        gate_proj / up_proj / down_proj) into the stacks; returns the parameter it went
        into."""
        param, rows = self._place(name)
        if kind != "weight":
            raise ValueError(f"unexpected expert tensor {name}.{kind}: these experts have "
                             "weights only (a quantized checkpoint whose config does not say "
                             "so? ERNIE 4.5 MoE's use_bias as transformers 4.x saves it, with "
                             "biased experts, is not supported)")
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
        down_proj [E, I, H] and their biases; Llama 4's (gate's columns, then up's; no
        biases); Qwen3-VL-MoE's (Llama 4's layout, or ours: `fused_untransposed`);
        returns the parameter it went into."""
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        if self.ungated is not None:
            return self._load_fused_ungated(name, tensor)
        shapes = {"gate_up_proj": ("w13", (e, h, 2 * i)), "down_proj": ("w2", (e, i, h)),
                  "gate_up_proj_bias": ("b13", (e, 2 * i)), "down_proj_bias": ("b2", (e, h))}
        if not self.fused_transposed or name not in shapes \
                or (name.endswith("_bias") and self.b13 is None) or _quantized_dtype(tensor):
            raise self.unexpected_fused(name, tensor)
        param, shape = shapes[name]
        if self.fused_untransposed and tensor.shape == getattr(self, param).shape:
            # transformers 5's save; a square one ([E, H, H]) is read so too, as HF's
            # loader reads it (Transpose(check_dims=True): the module's shape wins)
            with torch.no_grad():
                getattr(self, param).copy_(tensor)
            return param
        if tuple(tensor.shape) != shape:
            raise ValueError(f"experts {name} has shape {tuple(tensor.shape)}, the model "
                             f"expects {shape}")
        if self.scale_inputs:  # Llama 4's: per expert through load_expert, which a
            # quantized subclass quantizes (bitsandbytes in flight)
            leaves = (("gate_proj", slice(0, i)), ("up_proj", slice(i, 2 * i))) \
                if name == "gate_up_proj" else (("down_proj", slice(None)),)
            for expert in range(e):
                for leaf, cols in leaves:
                    param = self.load_expert(expert, leaf,
                                             tensor[expert, :, cols].T.contiguous())
            return param
        if name.startswith("gate_up") and self.interleaved:  # columns: gate's, then up's
            tensor = torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1)
        if tensor.dim() == 3:  # [E, in, out] -> [E, out, in]
            tensor = tensor.transpose(1, 2)
        with torch.no_grad():
            getattr(self, param).copy_(tensor)
        return param

    def unexpected_fused(self, name: str, tensor: torch.Tensor) -> ValueError:
        """Why a fused experts tensor (transformers 5's experts.gate_up_proj / down_proj,
        [E, ...], and whatever a quantizer saved beside them) cannot load here."""
        what = f"experts tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)})"
        if _quantized_dtype(tensor) or name.endswith(QUANTIZED_FUSED_SUFFIXES):
            return ValueError(
                f"{what} is part of a quantized fused experts tensor (transformers 5 saves a "
                "mixture's experts fused: experts.gate_up_proj / experts.down_proj, each "
                "[experts, out, in]): loraplex loads those in FP8 (with their _scale_inv), "
                "and MXFP4 ones of gpt-oss; other quantized experts load one expert at a time "
                "(experts.N.gate_proj / up_proj / down_proj or w1 / w3 / w2, with their "
                "scales), as vLLM reads them and llm-compressor, AutoGPTQ and AutoAWQ save "
                "them. Save the checkpoint's experts per expert, or serve the unquantized "
                "checkpoint with quantization='fp8' or 'bitsandbytes' to quantize it as it "
                "loads")
        expected = "up_proj, down_proj" if self.ungated is not None else \
            "gate_up_proj, down_proj" + (", their biases" if self.b13 is not None else "")
        return ValueError(f"unexpected {what} in the checkpoint: " + (
            f"these experts take {expected} fused" if self.fused_transposed else
            "these experts load one expert at a time (experts.N.<projection>.weight)"))

    def _load_fused_ungated(self, name: str, tensor: torch.Tensor) -> str:
        """Nemotron-H's experts as transformers 5 saves them: up_proj [E, I, H] and
        down_proj [E, H, I], our layout."""
        param = {"up_proj": "w13", "down_proj": "w2"}.get(name)
        if param is None or _quantized_dtype(tensor):
            raise self.unexpected_fused(name, tensor)
        if tensor.shape != getattr(self, param).shape:
            raise ValueError(f"experts {name} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(getattr(self, param).shape)}")
        with torch.no_grad():
            getattr(self, param).copy_(tensor)
        return param

    def _place(self, name: str) -> tuple[str, slice]:
        """(stack, its rows) of an expert projection's name."""
        proj = EXPERT_PROJECTIONS.get(name)
        if proj is None or proj not in (*self.w13_projections, "down"):
            expected = "up_proj, down_proj" if self.ungated is not None \
                else "w1, w2, w3 or gate_proj, up_proj, down_proj"
            raise ValueError(f"unexpected expert weight {name!r} (expected {expected})")
        i = self.intermediate_size
        if self.ungated is not None:
            return ("w13", slice(None)) if proj == "up" else ("w2", slice(None))
        return {"gate": ("w13", slice(0, i)), "up": ("w13", slice(i, 2 * i)),
                "down": ("w2", slice(None))}[proj]

    def finish_loading(self) -> None:
        """Raise if the checkpoint left part of the experts unset (after every tensor)."""

    def projections(self) -> list[tuple[int, str]]:
        """Every (expert, projection): what a quantized subclass's loading must cover."""
        return [(e, p) for e in range(self.num_experts)
                for p in (*self.w13_projections, "down")]

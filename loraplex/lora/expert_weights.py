"""An adapter's LoRA on a mixture of experts' experts, read from either PEFT format into
one (A [r, in], B [out, r]) per expert and projection ("gate", "up", "down").

- transformers 4 (and vLLM, LoRAX): a module per expert and projection,
  `...experts.{e}.w1` (Mixtral's w1 / w3 / w2) or `...experts.{e}.gate_proj` (up_proj,
  down_proj), each a plain LoRA pair.
- transformers 5, whose experts are two 3-D parameters, gate_up_proj [E, 2I, H] and
  down_proj [E, H, I]: PEFT's `target_parameters` wraps each in a ParamWrapper, saved
  as `...experts.lora_A` / `lora_B` (the second one targeted on the same module as
  `...experts.base_layer.lora_A` ...), with A [r * E, in] (expert-major) and
  B [out, r * E] (rank-major), so expert e's delta is B[:, e::E] @ A[e*r:(e+1)*r].
  Which parameter a pair belongs to follows from its shape; gate_up's A serves gate and up.
  gpt-oss's experts are stored transposed (gate_up_proj [E, H, 2I], down_proj [E, I, H],
  PEFT's in x out already) with gate and up interleaved: gate_up's B rows 0::2 are gate's,
  1::2 up's (`interleaved`).
  Llama 4's are stored as gpt-oss's (gate's columns, then up's), but PEFT takes its
  3-D parameters for [E, out, in] (`swapped`): its A is [r * E, 2I] / [r * E, H] and
  its delta B A is added to [E, H, 2I] / [E, I, H] as it is, so x's LoRA is
  x B_e A_e: our A is B_e^T, our B is A_e^T.

Nemotron-H's experts have no gate (`ungated`): per expert up_proj / down_proj, or the
3-D up_proj [E, I, H] and down_proj [E, H, I], one ParamWrapper each (their shapes tell
them apart unless I = H, which is refused as ambiguous).

Which of a 3-D parameter's dimensions PEFT reads as in and out changed with its version
(`peft_swapped`): up to 0.18 always [E, in, out]; 0.19.0 [E, out, in] where
transformers marks the experts `is_transposed` (gpt-oss on transformers 5), else
[E, in, out]; from 0.19.1 the other way round (peft#3165 fixed 0.19.0's). An adapter's
adapter_config.json names its version (`peft_version`, from 0.18; none: older); a pair
whose shapes fit only the other reading is read that way (gpt-oss trained on
transformers 4, which has no `is_transposed`, by PEFT 0.19.1 or later).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from loraplex.layers.experts import EXPERT_PROJECTIONS
from loraplex.lora.errors import LoRAError

# transformers 5's expert parameters (up_proj: Nemotron-H's, without a gate)
FUSED_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
_PER_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<leaf>\w+)$")
_FUSED = re.compile(r"^(?P<layer>.+\.experts)(?:\.base_layer)*$")


@dataclass(frozen=True)
class ExpertsShape:
    num_experts: int
    hidden_size: int
    intermediate_size: int
    interleaved: bool = False  # gpt-oss: gate_up's outputs alternate gate, up
    # transformers holds the parameters [E, in, out] (gpt-oss, Llama 4), not [E, out, in]
    in_out: bool = False
    is_transposed: bool = False  # transformers 5's `is_transposed` on them (gpt-oss)
    ungated: bool = False  # no gate: up and down (Nemotron-H)

    def dims(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of one expert's projection."""
        h, i = self.hidden_size, self.intermediate_size
        return (i, h) if proj == "down" else (h, i)


def expert_target(module: str, experts: dict[str, ExpertsShape]
                  ) -> tuple[str, int | None, str | None] | None:
    """(experts layer, expert, projection) of a per-expert module name, (experts layer,
    None, None) of a fused one, None if the module is not on the experts."""
    m = _PER_EXPERT.match(module)
    if m is not None and m.group("layer") in experts:
        if m.group("leaf") not in EXPERT_PROJECTIONS:
            return None
        return m.group("layer"), int(m.group("expert")), EXPERT_PROJECTIONS[m.group("leaf")]
    m = _FUSED.match(module)
    if m is not None and m.group("layer") in experts:
        return m.group("layer"), None, None
    return None


def check_expert(name: str, layer: str, expert: int, proj: str, a: torch.Tensor,
                 b: torch.Tensor, shape: ExpertsShape) -> None:
    in_f, out_f = shape.dims(proj)
    if shape.ungated and proj == "gate":
        raise LoRAError(f"LoRA adapter {name!r}: {layer}.{expert} has a LoRA on a gate "
                        "projection, which these experts do not have (up_proj, down_proj)")
    if expert >= shape.num_experts:
        raise LoRAError(f"LoRA adapter {name!r}: {layer}.{expert} is past the model's "
                        f"{shape.num_experts} experts; the adapter was trained for another "
                        "base model")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, a.shape[0]):
        raise LoRAError(f"LoRA adapter {name!r}: expert {expert}'s {proj} projection in "
                        f"{layer} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                        f"fit it (in={in_f}, out={out_f}); the adapter was trained for another "
                        "base model")


def peft_swapped(shape: ExpertsShape, peft_version: str | None) -> bool:
    """Whether PEFT `peft_version` made a ParamWrapper's A the factor of the projection's
    output and B of its input (x's LoRA is x B_e A_e): where it read the parameter's
    in and out the other way round from how transformers holds it."""
    v = tuple(int(p) for p in re.findall(r"\d+", peft_version or "0")[:3])
    if v < (0, 19, 0):
        peft_out_in = False
    elif v < (0, 19, 1):
        peft_out_in = shape.is_transposed
    else:
        peft_out_in = not shape.is_transposed
    return peft_out_in == shape.in_out


def fused_parameter(name: str, layer: str, a: torch.Tensor, b: torch.Tensor,
                    shape: ExpertsShape, swapped: bool) -> tuple[str, bool]:
    """Which 3-D parameter (gate_up_proj or down_proj) a PEFT ParamWrapper pair adapts,
    and whether it is `swapped`: as `swapped` says where the shapes fit both readings,
    else the one they fit."""
    e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
    if shape.ungated:
        return _ungated_parameter(name, layer, a, b, shape), False
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] and a.shape[0] % e == 0:
        dims = (a.shape[1], b.shape[0])
        for swap in (swapped, not swapped):
            if dims == ((2 * i, h) if swap else (h, 2 * i)):
                return "gate_up_proj", swap
            if dims == ((h, i) if swap else (i, h)):
                return "down_proj", swap
    raise LoRAError(f"LoRA adapter {name!r}: the LoRA on {layer} (A {tuple(a.shape)}, B "
                    f"{tuple(b.shape)}) fits neither gate_up_proj [{e}, {2 * i}, {h}] nor "
                    f"down_proj [{e}, {h}, {i}]; the adapter was trained for another base model")


def _ungated_parameter(name: str, layer: str, a: torch.Tensor, b: torch.Tensor,
                      shape: ExpertsShape) -> str:
    """up_proj or down_proj, for experts without a gate (Nemotron-H's [E, out, in], as
    PEFT reads them)."""
    e, h, i = shape.num_experts, shape.hidden_size, shape.intermediate_size
    if h == i:
        raise LoRAError(f"LoRA adapter {name!r}: the LoRA on {layer} cannot be told apart "
                        f"between up_proj and down_proj (both [{e}, {h}, {i}]); target the "
                        "experts per expert (experts.{e}.up_proj ...) instead")
    if a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] and a.shape[0] % e == 0:
        dims = (a.shape[1], b.shape[0])
        if dims == (h, i):
            return "up_proj"
        if dims == (i, h):
            return "down_proj"
    raise LoRAError(f"LoRA adapter {name!r}: the LoRA on {layer} (A {tuple(a.shape)}, B "
                    f"{tuple(b.shape)}) fits neither up_proj [{e}, {i}, {h}] nor down_proj "
                    f"[{e}, {h}, {i}]; the adapter was trained for another base model")


def split_fused(param: str, a: torch.Tensor, b: torch.Tensor, shape: ExpertsShape,
                swapped: bool) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """A ParamWrapper pair -> {(expert, projection): (A [r, in], B [out, r])}."""
    e, i = shape.num_experts, shape.intermediate_size
    r = a.shape[0] // e
    a_e = a.reshape(e, r, a.shape[1])  # expert-major
    b_e = b.reshape(b.shape[0], r, e)  # rank-major
    out = {}
    for expert in range(e):
        a_x, b_x = a_e[expert], b_e[:, :, expert]
        if swapped:  # x B_e A_e: A = B_e^T [r, in], B = A_e^T [out, r]
            a_x, b_x = b_x.T, a_x.T
        if param == "down_proj":
            out[expert, "down"] = (a_x, b_x)
        elif param == "up_proj":  # no gate (Nemotron-H)
            out[expert, "up"] = (a_x, b_x)
        elif shape.interleaved:  # one A, B's rows alternate gate's and up's
            out[expert, "gate"] = (a_x, b_x[0::2])
            out[expert, "up"] = (a_x, b_x[1::2])
        else:  # one A, B's rows: gate's then up's
            out[expert, "gate"] = (a_x, b_x[:i])
            out[expert, "up"] = (a_x, b_x[i:])
    return out

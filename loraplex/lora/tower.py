"""LoRA on a multimodal model's tower (vision or audio encoder) and connector (projector):
vLLM's enable_tower_connector_lora.

Every nn.Linear of the tower and the projector (a VisionWeights: models/llava.py and its
siblings) gets adapter slots beside the language model's: the same max_loras slots, an
adapter in the same slot everywhere, one LoRAManager. The tower runs once per adapter
among a step's new images (ModelRunner._encode_images), every row of that call under
the adapter's slot (`tower_adapter`). So no layer needs per-row slot indices, whatever
the tower does to the number of rows between its layers (a patch merge, a pixel
shuffle, a pooling, a projector over fewer rows than the encoder): each layer makes a
LoRABatchMeta of one slot for the rows it sees. Towers feed 3-D inputs ([tiles,
patches, D]) to their linears; the op takes rows, so they are flattened.

The manager names these layers TOWER_PREFIX + the tower's own name (VisionWeights.ours
of an adapter's HF module name), apart from the language model's.

`tower_adapter` is a context of its own, not worker/context.py's StepContext (which
Whisper's encoder runs in: its linears are the language model's kind, one LoRABatchMeta
over its fixed rows): a tower call runs before the step's forward opens its StepContext,
and what it carries is one slot, not per-row slots, for rows whose count changes between
its layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.meta import LoRABatchMeta

TOWER_PREFIX = "tower."


class TowerLinearWithLoRA(LinearWithLoRA):
    """A tower or projector nn.Linear with adapter slots: all its rows under the slot of
    the tower call it runs in (`tower_adapter`)."""

    @staticmethod
    def _dims(base_layer: nn.Module) -> tuple[int, list[int]]:
        return base_layer.in_features, [base_layer.out_features]

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight: the towers read its dtype."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # [..., in] -> [rows, in]
        y = self._add_lora(self.base_layer(rows), rows, _call_meta(self, rows.shape[0]))
        return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class _TowerCall:
    slot: int  # -1: the base
    device: torch.device
    metas: dict[int, LoRABatchMeta] = field(default_factory=dict)  # by row count


_current: _TowerCall | None = None


@contextmanager
def tower_adapter(slot: int, device: torch.device) -> Iterator[None]:
    """Run the tower under adapter slot `slot` (-1: the base) for the duration."""
    global _current
    if _current is not None:
        raise RuntimeError("nested tower_adapter is not allowed")
    _current = _TowerCall(slot, torch.device(device))
    try:
        yield
    finally:
        _current = None


def _call_meta(layer: LinearWithLoRA, rows: int) -> LoRABatchMeta | None:
    """`rows` rows all in the call's slot; None when the layer has no weights there."""
    call = _current
    if call is None:
        raise RuntimeError("a tower with LoRA layers runs inside tower_adapter "
                           "(ModelRunner._encode_images)")
    if call.slot < 0 or not layer.slot_ranks[call.slot]:
        return None
    meta = call.metas.get(rows)
    if meta is None:  # shared by the call's layers that see as many rows
        meta = call.metas[rows] = LoRABatchMeta.make([call.slot] * rows, call.device)
    return meta


def wrap_tower(tower: nn.Module, max_loras: int, max_rank: int, dtype: torch.dtype
               ) -> dict[str, TowerLinearWithLoRA]:
    """Swap every nn.Linear of the tower and projector for its LoRA wrapper; keyed by
    TOWER_PREFIX + its name in `tower`."""
    wrapped: dict[str, TowerLinearWithLoRA] = {}
    for name, module in list(tower.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            wrapper = TowerLinearWithLoRA(module, max_loras, max_rank, dtype)
            setattr(tower.get_submodule(parent), leaf, wrapper)
            wrapped[TOWER_PREFIX + name] = wrapper
    return wrapped


def has_tower_lora(tower: nn.Module | None) -> bool:
    """Whether `tower` was given adapter slots (wrap_tower)."""
    return tower is not None and any(isinstance(m, TowerLinearWithLoRA)
                                     for m in tower.modules())

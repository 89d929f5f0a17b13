"""Adapters in the engine: registry, host cache (LRU) and device slots (LRU).

    registered (name, path)  ->  host cache (max_cpu_loras, LRU)  ->  device slot (max_loras, LRU)

Registration validates the adapter by loading it into the host cache. An adapter
evicted from the host cache is read again from its path when next needed. A device
slot is only reused when its adapter is not in the running batch and not pinned.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from loraplex.config import LoRAConfig
from loraplex.lora.adapter import LoRAModel, TargetShapes, load_adapter
from loraplex.lora.errors import LoRAError
from loraplex.lora.layers import LinearWithLoRA
from loraplex.lora.request import LoRARequest

logger = logging.getLogger(__name__)


def wrap_lora_layers(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype
                     ) -> dict[str, LinearWithLoRA]:
    """Swap every projection an adapter may target for a LinearWithLoRA wrapper."""
    packed_names = {packed for packed, _ in model.packed_modules_mapping.values()}
    wanted = packed_names | set(model.lora_target_modules)
    wrapped: dict[str, LinearWithLoRA] = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in wanted and not isinstance(module, LinearWithLoRA):
            parent_name, _, leaf = name.rpartition(".")
            wrapper = LinearWithLoRA(module, cfg.max_loras, cfg.max_lora_rank, dtype)
            setattr(model.get_submodule(parent_name), leaf, wrapper)
            wrapped[name] = wrapper
    return wrapped


class LoRAManager:
    def __init__(self, model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.dtype = cfg.lora_dtype or dtype
        self.layers = wrap_lora_layers(model, cfg, self.dtype)
        self._packed = model.packed_modules_mapping
        self.targets = self._target_shapes(model)
        self.registered: dict[int, LoRARequest] = {}
        self._host: OrderedDict[int, LoRAModel] = OrderedDict()  # LRU: oldest first
        self.lora_index_to_id: list[int | None] = [None] * cfg.max_loras
        self._slot_lru: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, oldest first
        self.pinned: set[int] = set()
        self.stats = {"slot_hits": 0, "slot_loads": 0, "host_hits": 0, "host_loads": 0}

    def _target_shapes(self, model: nn.Module) -> TargetShapes:
        shapes: dict[str, tuple[int, int]] = {}
        inverse: dict[str, list[str]] = {}
        for hf_name, (packed, _) in sorted(self._packed.items(), key=lambda kv: kv[1][1]):
            inverse.setdefault(packed, []).append(hf_name)
        for name, layer in self.layers.items():
            prefix, _, leaf = name.rpartition(".")
            base = layer.base_layer
            for k, hf_leaf in enumerate(inverse.get(leaf, [leaf])):
                shapes[f"{prefix}.{hf_leaf}"] = (base.in_features, base.output_sizes[k])
        return TargetShapes(shapes=shapes, suffixes=tuple(model.lora_target_modules))

    # ---- registry and host tier -------------------------------------------------------
    def prepare(self, req: LoRARequest) -> LoRAModel:
        """Read and validate from disk/hub. Touches no shared state: safe on any thread."""
        return load_adapter(req, self.targets, self.cfg.max_lora_rank, self.dtype)

    def add(self, req: LoRARequest, prepared: LoRAModel | None = None) -> bool:
        """Register an adapter (validating it). False if this exact adapter is already in."""
        old = self.registered.get(req.lora_int_id)
        if old is not None:
            if old.lora_path != req.lora_path or old.lora_name != req.lora_name:
                raise LoRAError(
                    f"lora_int_id {req.lora_int_id} is already used by adapter "
                    f"{old.lora_name!r} ({old.lora_path}); give {req.lora_name!r} "
                    "(" + req.lora_path + ") its own lora_int_id")
            return False
        lora = prepared if prepared is not None else self.prepare(req)
        self.registered[req.lora_int_id] = req
        self._put_host(lora)
        return True

    def remove(self, lora_int_id: int) -> bool:
        if self.registered.pop(lora_int_id, None) is None:
            return False
        self._host.pop(lora_int_id, None)
        self.pinned.discard(lora_int_id)
        slot = self._slot_lru.pop(lora_int_id, None)
        if slot is not None:
            self._reset_slot(slot)
        return True

    def pin(self, lora_int_id: int) -> bool:
        if lora_int_id not in self.registered:
            raise LoRAError(f"cannot pin lora_int_id {lora_int_id}: no such adapter")
        if lora_int_id not in self.pinned and len(self.pinned) >= self.cfg.max_loras:
            raise LoRAError(f"cannot pin more than max_loras={self.cfg.max_loras} adapters")
        self.pinned.add(lora_int_id)
        return True

    def _put_host(self, lora: LoRAModel) -> None:
        self._host[lora.lora_int_id] = lora
        self._host.move_to_end(lora.lora_int_id)
        while len(self._host) > self.cfg.max_cpu_loras:
            evicted, _ = self._host.popitem(last=False)
            logger.debug("evicted adapter %d from the host cache", evicted)

    def _get_host(self, lora_int_id: int) -> LoRAModel:
        lora = self._host.get(lora_int_id)
        if lora is not None:
            self._host.move_to_end(lora_int_id)
            self.stats["host_hits"] += 1
            return lora
        self.stats["host_loads"] += 1
        lora = self.prepare(self.registered[lora_int_id])  # evicted earlier: read again
        self._put_host(lora)
        return lora

    # ---- device slots -----------------------------------------------------------------
    def slot_of(self, lora_int_id: int) -> int:
        return self._slot_lru[lora_int_id]

    def activate(self, lora_ids: set[int]) -> tuple[dict[int, int], dict[int, LoRAError]]:
        """Give every adapter of the batch a device slot.

        Returns (id -> slot, id -> error for adapters that could not be (re)loaded);
        the caller fails the requests of the latter. Never evicts an adapter of this
        batch or a pinned one.
        """
        failed: dict[int, LoRAError] = {}
        for lora_id in lora_ids:
            if lora_id in self._slot_lru:
                self._slot_lru.move_to_end(lora_id)
                self.stats["slot_hits"] += 1
                continue
            try:
                if lora_id not in self.registered:
                    raise LoRAError(f"adapter id {lora_id} is not registered")
                lora = self._get_host(lora_id)
            except LoRAError as e:
                failed[lora_id] = e
                continue
            slot = self._free_slot(lora_ids)
            self._load_slot(slot, lora)
            self._slot_lru[lora_id] = slot
            self.stats["slot_loads"] += 1
        return {i: self._slot_lru[i] for i in lora_ids if i not in failed}, failed

    def _free_slot(self, keep: set[int]) -> int:
        for slot, owner in enumerate(self.lora_index_to_id):
            if owner is None:
                return slot
        for lora_id, slot in self._slot_lru.items():  # oldest first
            if lora_id not in keep and lora_id not in self.pinned:
                del self._slot_lru[lora_id]
                return slot
        raise RuntimeError("no free LoRA slot: the scheduler admitted more than max_loras "
                           "adapters (bug)")

    def _load_slot(self, slot: int, lora: LoRAModel) -> None:
        grouped: dict[str, dict[int, tuple]] = {}
        for module, w in lora.modules.items():
            prefix, _, leaf = module.rpartition(".")
            packed, k = self._packed.get(leaf, (leaf, 0))
            grouped.setdefault(f"{prefix}.{packed}", {})[k] = (w.lora_a, w.lora_b)
        for name, layer in self.layers.items():
            parts = grouped.get(name)
            if parts is None:
                layer.reset_lora(slot)
                continue
            n = len(layer.output_sizes)
            layer.set_lora(slot, [parts[k][0] if k in parts else None for k in range(n)],
                           [parts[k][1] if k in parts else None for k in range(n)])
        self.lora_index_to_id[slot] = lora.lora_int_id

    def _reset_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.reset_lora(slot)
        self.lora_index_to_id[slot] = None

    def num_unpinned_capacity(self, batch: set[int]) -> int:
        """How many distinct adapters a batch may hold: slots not held by pinned outsiders."""
        return self.cfg.max_loras - len(self.pinned - batch)

"""Adapters in the engine: a registry and three tiers, each with a size and an LRU.

    registered (name -> source, config checked)       any number, nothing loaded
      -> host cache (max_cpu_loras, LRU)              read + validated on a loader thread
      -> device slot (max_loras, LRU)                 copied in when a batch needs it

Registration only checks adapter_config.json, so thousands can be registered. Weights
are read off the step loop (AdapterLoader): a request whose adapter is not in host
memory waits while it loads, and the scheduler runs everyone else. Adapters of queued
requests are prefetched to host memory before their turn. A device slot is only reused
when its adapter is not in the running batch and not pinned.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from loraplex.config import LoRAConfig
from loraplex.layers.experts import FusedExperts
from loraplex.lora.adapter import (
    LoRAModel,
    PackedLoRA,
    TargetShapes,
    check_adapter_config,
    load_adapter,
    local_adapter_dir,
    resolve_adapter_path,
)
from loraplex.lora.added_tokens import AddedTokens, load_adapter_tokenizer
from loraplex.lora.errors import LoRAError
from loraplex.lora.expert_weights import ExpertsShape
from loraplex.lora.experts import ExpertsWithLoRA
from loraplex.lora.extra_vocab import ExtraVocabSlots
from loraplex.lora.full_vocab import FullVocabSlots
from loraplex.lora.layers import EmbeddingWithLoRA, LinearWithLoRA
from loraplex.lora.loader import AdapterLoader
from loraplex.lora.request import LoRARequest
from loraplex.lora.tower import TOWER_PREFIX, wrap_tower
from loraplex.models.llava import VisionWeights

logger = logging.getLogger(__name__)


@dataclass
class LoRACacheStats:
    """Counters since start: where each adapter activation found its weights."""

    slot_hits: int = 0  # already in a device slot
    host_hits: int = 0  # copied to a slot from host memory
    host_misses: int = 0  # had to be read from disk/hub first (a load)
    load_failures: int = 0


def _join(prefix: str, leaf: str) -> str:
    """A module's full name from its parent's ('' for a top-level one such as lm_head)."""
    return f"{prefix}.{leaf}" if prefix else leaf


LoRALayer = LinearWithLoRA | ExpertsWithLoRA


def _refuse_head_bias(args: Any, option: str) -> None:
    """Whole lm_head tables an adapter brings are served without a bias: refused on a
    model whose lm_head has one (Phi), as adapters that add tokens are (added_tokens.py)."""
    if getattr(args, "lm_head_bias", False):
        raise ValueError(f"{option} is not supported on a model whose lm_head has a bias "
                         "(Phi): an adapter's own lm_head would be served without it")


def served_modules(model: nn.Module, cfg: LoRAConfig) -> tuple[str, ...]:
    """The HF module names that get adapter slots: cfg.target_modules, or every one the
    model supports. Naming one part of a packed layer (q_proj of qkv_proj) serves all its
    parts: they share the layer's slots."""
    supported = tuple(model.lora_target_modules)
    if cfg.target_modules is None:
        return supported
    unknown = [n for n in cfg.target_modules if n not in supported]
    if unknown:
        raise ValueError(f"lora_target_modules: {', '.join(unknown)} not in this model "
                         f"(it supports {', '.join(supported)}, or all)")
    packs = {packed for hf, (packed, _) in model.packed_modules_mapping.items()
             if hf in cfg.target_modules}
    chosen = set(cfg.target_modules) | {hf for hf, (packed, _)
                                        in model.packed_modules_mapping.items()
                                        if packed in packs}
    return tuple(n for n in supported if n in chosen)


def wrap_lora_layers(model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype,
                     served: tuple[str, ...]) -> dict[str, LoRALayer]:
    """Swap every module of `served` (HF names) for its LoRA wrapper: the projections
    and lm_head for LinearWithLoRA, the token embedding for EmbeddingWithLoRA, a mixture
    of experts' experts for ExpertsWithLoRA."""
    packed_names = {packed for hf_name, (packed, _) in model.packed_modules_mapping.items()
                    if hf_name in served}
    wanted = packed_names | set(served)
    wrapped: dict[str, LoRALayer] = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in wanted and not isinstance(module, LoRALayer):
            parent_name, _, leaf = name.rpartition(".")
            cls = EmbeddingWithLoRA if isinstance(module, nn.Embedding) else \
                ExpertsWithLoRA if isinstance(module, FusedExperts) else LinearWithLoRA
            wrapper = cls(module, cfg.max_loras, cfg.max_lora_rank, dtype)
            setattr(model.get_submodule(parent_name), leaf, wrapper)
            wrapped[name] = wrapper
    return wrapped


def _no_added_tokens(args: Any) -> bool:
    """Gemma 4 with per-layer embeddings: an added token would have no row there."""
    return getattr(args, "gemma4", None) is not None and args.gemma4.ple_size > 0


class LoRAManager:
    def __init__(self, model: nn.Module, cfg: LoRAConfig, dtype: torch.dtype,
                 classifier_heads: bool = False, tower: VisionWeights | None = None) -> None:
        """`tower`: a multimodal model's tower and projector, whose linear layers get
        slots too (--enable-tower-connector-lora, lora/tower.py); None: the language model
        alone."""
        self.cfg = cfg
        self.dtype = cfg.lora_dtype or dtype
        self.served = served_modules(model, cfg)
        try:
            self.layers = wrap_lora_layers(model, cfg, self.dtype, self.served)
            if tower is not None:
                self.layers.update(wrap_tower(tower, cfg.max_loras, cfg.max_lora_rank,
                                              self.dtype))
        except torch.OutOfMemoryError as e:
            raise ValueError(
                f"the adapter slots (max_loras={cfg.max_loras} x max_lora_rank="
                f"{cfg.max_lora_rank} on every LoRA layer) do not fit in device memory: "
                "lower max_loras or max_lora_rank") from e
        if not self.layers:
            raise ValueError(f"lora_target_modules {' '.join(self.served)}: no such module in "
                             "this model, so no adapter could be served")
        self.device = next(next(iter(self.layers.values())).buffers()).device
        self.extra_vocab = self._extra_vocab_slots(model, cfg)
        self.full_vocab = self._full_vocab_slots(model, cfg)
        self._packed = model.packed_modules_mapping
        self.targets = replace(self._target_shapes(model), classifier_heads=classifier_heads,
                               tower=tower.ours if tower is not None else None)
        self.registered: dict[int, LoRARequest] = {}
        # a number per registration, never reused: the KV prefix cache's salt, so a
        # removed and re-added id never shares K/V computed under the old weights
        self._registration: dict[int, int] = {}
        self._registrations = itertools.count(1)
        # adapters that add tokens past the base vocabulary: how many, and the adapter's
        # own tokenizer, which its requests are encoded and decoded with
        self.added_token_counts: dict[int, int] = {}
        self.tokenizers: dict[int, Any] = {}
        self._host: OrderedDict[int, PackedLoRA] = OrderedDict()  # LRU: oldest first
        self.lora_index_to_id: list[int | None] = [None] * cfg.max_loras
        # slots holding a DoRA adapter or one with lora_bias (their layers' extra terms are
        # host decisions): the model runner decodes a batch using one eagerly
        self.eager_slots: set[int] = set()
        # long-context LoRA: adapter id -> the first row of its rope table (rotary.py), read
        # by the model runner for the positions of its tokens; absent = the base's rows
        self.rope_offsets: dict[int, int] = {}
        self._rope_rows = model.model.rotary.lora_offsets
        self._slot_lru: OrderedDict[int, int] = OrderedDict()  # lora id -> slot, oldest first
        self.pinned: set[int] = set()
        self.loader = AdapterLoader(self.prepare, cfg.num_load_workers, self.device)
        self.stats = LoRACacheStats()
        # host -> device copies on their own stream, so they can overlap compute on a GPU
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" \
            else None

    def _target_shapes(self, model: nn.Module) -> TargetShapes:
        shapes: dict[str, tuple[int, int]] = {}
        inverse: dict[str, list[str]] = {}
        for hf_name, (packed, _) in sorted(self._packed.items(), key=lambda kv: kv[1][1]):
            inverse.setdefault(packed, []).append(hf_name)
        vocab_layers: dict[str, torch.Tensor] = {}
        experts: dict[str, ExpertsShape] = {}
        for name, layer in self.layers.items():
            if isinstance(layer, ExpertsWithLoRA):
                experts[name] = ExpertsShape(layer.num_experts, layer.hidden_size,
                                             layer.intermediate_size,
                                             layer.base_layer.interleaved,
                                             layer.base_layer.peft_in_out,
                                             layer.base_layer.peft_is_transposed,
                                             layer.base_layer.ungated is not None)
                continue
            prefix, _, leaf = name.rpartition(".")
            if name.startswith(TOWER_PREFIX):  # the tower's own, unpacked linears
                shapes[name] = (layer.in_features, layer.output_sizes[0])
                continue
            # (a packed layer may hold fewer parts than the mapping names: Gemma 4's q
            # alone, or q and k without v)
            for k, hf_leaf in zip(range(len(layer.output_sizes)), inverse.get(leaf, [leaf])):
                shapes[_join(prefix, hf_leaf)] = (layer.in_features, layer.output_sizes[k])
            if isinstance(layer, EmbeddingWithLoRA) or leaf == "lm_head":
                vocab_layers[name] = layer.base_layer.weight.detach()
        return TargetShapes(shapes=shapes, suffixes=tuple(model.lora_target_modules),
                            vocab_size=model.args.vocab_size, base_weights=vocab_layers,
                            extra_vocab_size=0 if _no_added_tokens(model.args)
                            else self.cfg.lora_extra_vocab_size,
                            tied_embeddings=bool(model.args.tie_word_embeddings),
                            lm_head_bias=bool(getattr(model.args, "lm_head_bias", False)),
                            experts=experts, aliases=self._aliases(model.args),
                            unserved=tuple(n for n in model.lora_target_modules
                                           if n not in self.served),
                            full_vocab=self.cfg.modules_to_save,
                            max_position=model.args.max_position,
                            long_lora_factors=self.cfg.long_lora_scaling_factors,
                            text_only=model.args.text_only,
                            refused=dict(getattr(model, "lora_refused_modules", {})),
                            ignored=frozenset(getattr(model, "lora_ignored_modules", ())))

    @staticmethod
    def _aliases(args: Any) -> dict[str, str]:
        """transformers 5 names Mixtral's block_sparse_moe `mlp` (its adapters too); Mamba2's
        and Nemotron-H's adapters name our model and embed_tokens backbone and embeddings."""
        if args.num_experts and args.moe_module == "block_sparse_moe":
            return {"mlp": args.moe_module}
        return dict(args.adapter_aliases)

    def _embedding(self) -> EmbeddingWithLoRA | None:
        """The wrapped token embedding, which serves the per-slot vocabulary rows."""
        return next((m for m in self.layers.values() if isinstance(m, EmbeddingWithLoRA)),
                    None)

    def _extra_vocab_slots(self, model: nn.Module, cfg: LoRAConfig) -> ExtraVocabSlots | None:
        """Rows for the tokens adapters add (lora_extra_vocab_size per slot), served by
        the embedding and, for the logits, by the model runner."""
        embed = self._embedding()
        if not cfg.lora_extra_vocab_size or embed is None:
            return None
        if _no_added_tokens(model.args):
            logger.info("Gemma 4: adapters that add tokens are not served (their tokens "
                        "have no per-layer embedding rows); lora_extra_vocab_size ignored")
            return None
        a = model.args
        # rows as wide as the embedding (OPT-350m's are narrower than its layers)
        embed.extra_vocab = ExtraVocabSlots(a.vocab_size, cfg.max_loras,
                                            cfg.lora_extra_vocab_size,
                                            embed.base_layer.embedding_dim,
                                            self.dtype, self.device)
        return embed.extra_vocab

    def _full_vocab_slots(self, model: nn.Module, cfg: LoRAConfig) -> FullVocabSlots | None:
        """Whole embed_tokens / lm_head tables per slot (modules_to_save), served by the
        embedding and, for the logits, by the model runner."""
        if not cfg.modules_to_save:
            return None
        embed = self._embedding()
        if embed is None or "lm_head" not in self.layers:
            raise ValueError("--enable-lora-modules-to-save needs embed_tokens and lm_head "
                             "among --lora-target-modules")
        a = model.args
        _refuse_head_bias(a, "--enable-lora-modules-to-save")
        try:
            embed.full_vocab = FullVocabSlots(a.vocab_size, cfg.max_loras,
                                              embed.base_layer.embedding_dim,
                                              self.dtype, self.device)
        except torch.OutOfMemoryError as e:
            raise ValueError(f"--enable-lora-modules-to-save: max_loras={cfg.max_loras} "
                             "slots of two vocabulary tables each do not fit in device "
                             "memory; lower max_loras") from e
        return embed.full_vocab

    def fixed_slot_bytes(self) -> int:
        """Bytes of one slot whatever its adapter's rank: added-token rows, whole tables."""
        return sum(x.slot_bytes() for x in (self.extra_vocab, self.full_vocab) if x is not None)

    def slot_bytes_per_rank(self) -> int:
        """Bytes of one slot at rank 1 over all wrapped layers (A and B of every slice)."""
        return sum(layer.slot_bytes_per_rank() for layer in self.layers.values())

    # ---- registry ---------------------------------------------------------------------
    def prepare(self, req: LoRARequest) -> PackedLoRA:
        """Read, validate and lay out for the slots (pack). Touches no shared state: safe
        on any thread, so all of this stays off the step loop."""
        start = time.perf_counter()
        try:
            return self.pack(load_adapter(req, self.targets, self.cfg.max_lora_rank,
                                          self.dtype))
        finally:
            self.loader.record(time.perf_counter() - start)

    def pack(self, lora: LoRAModel) -> PackedLoRA:
        """HF modules (q_proj, k_proj, ...) -> one A and one B per LoRA layer (qkv_proj)
        in its slot layout; page-locked on a GPU, so a slot copy is asynchronous."""
        grouped: dict[str, dict[int, tuple]] = {}
        for module, w in lora.modules.items():
            prefix, _, leaf = module.rpartition(".")
            packed, k = ((leaf, 0) if module.startswith(TOWER_PREFIX)
                         else self._packed.get(leaf, (leaf, 0)))
            grouped.setdefault(_join(prefix, packed), {})[k] = w
        layers = {}
        for name, parts in grouped.items():
            layer = self.layers[name]
            ws = [parts.get(k) for k in range(len(layer.output_sizes))]
            layers[name] = layer.pack([w.lora_a if w else None for w in ws],
                                      [w.lora_b if w else None for w in ws],
                                      pin_memory=self.device.type == "cuda",
                                      magnitudes=[w.magnitude if w else None for w in ws],
                                      biases=[w.bias if w else None for w in ws])
        for name, parts in lora.experts.items():
            layers[name] = self.layers[name].pack(
                {key: (w.lora_a, w.lora_b) for key, w in parts.items()},
                pin_memory=self.device.type == "cuda")
        added, full = lora.added_tokens, lora.full_vocab
        if self.device.type == "cuda":
            if added is not None:
                added = AddedTokens(added.input_embeddings.pin_memory(),
                                    added.output_embeddings.pin_memory())
            full = {k: v.pin_memory() for k, v in full.items()}
        return PackedLoRA(lora.lora_int_id, layers, added, lora.path, full, lora.rope_factor,
                          dora=any(w.magnitude is not None for w in lora.modules.values()),
                          bias=any(w.bias is not None for w in lora.modules.values()))

    def _check_id(self, req: LoRARequest) -> bool:
        """False if this exact adapter is registered already; raises if the id is taken."""
        old = self.registered.get(req.lora_int_id)
        if old is None:
            return True
        if old.lora_path != req.lora_path or old.lora_name != req.lora_name:
            raise LoRAError(
                f"lora_int_id {req.lora_int_id} is already used by adapter "
                f"{old.lora_name!r} ({old.lora_path}); give {req.lora_name!r} "
                "(" + req.lora_path + ") its own lora_int_id")
        return False

    def register(self, req: LoRARequest) -> bool:
        """Cheap registration: the config is checked, the weights are read when needed."""
        if not self._check_id(req):
            return False
        added = check_adapter_config(req, self.targets, self.cfg.max_lora_rank)
        tokenizer = self._tokenizer(req, local_adapter_dir(req), added) if added else None
        self._register(req, added, tokenizer)
        return True

    def _tokenizer(self, req: LoRARequest, path: str, added: int) -> Any:
        return load_adapter_tokenizer(req.lora_name, path, self.targets.vocab_size, added)

    def _register(self, req: LoRARequest, added_tokens: int = 0, tokenizer: Any = None
                  ) -> None:
        self.registered[req.lora_int_id] = req
        self._registration[req.lora_int_id] = next(self._registrations)
        if added_tokens:
            self.added_token_counts[req.lora_int_id] = added_tokens
            self.tokenizers[req.lora_int_id] = tokenizer

    def registration_of(self, lora_int_id: int) -> int:
        return self._registration[lora_int_id]

    def add(self, req: LoRARequest, prepared: PackedLoRA | None = None) -> bool:
        """Register and load now (validating everything). False if already registered."""
        if not self._check_id(req):
            return False
        lora = prepared if prepared is not None else self.prepare(req)
        added = lora.added_tokens.num_tokens if lora.added_tokens is not None else 0
        # from the directory it was read from: no hub lookup on this (the engine's) thread
        tokenizer = self._tokenizer(req, lora.path or resolve_adapter_path(req), added) \
            if added else None
        self._register(req, added, tokenizer)
        self.loader.cancel(req.lora_int_id)
        self._put_host(lora)
        return True

    def remove(self, lora_int_id: int) -> bool:
        if self.registered.pop(lora_int_id, None) is None:
            return False
        del self._registration[lora_int_id]
        self.added_token_counts.pop(lora_int_id, None)
        self.tokenizers.pop(lora_int_id, None)
        self.rope_offsets.pop(lora_int_id, None)
        self.loader.cancel(lora_int_id)
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

    # ---- host tier and background loads -----------------------------------------------
    def is_ready(self, lora_int_id: int) -> bool:
        """Can run now: in a device slot or in host memory."""
        return lora_int_id in self._slot_lru or lora_int_id in self._host

    def is_loading(self, lora_int_id: int) -> bool:
        return lora_int_id in self.loader

    def prefetch(self, queued: Iterable[int]) -> None:
        """Bring the adapters of queued requests (ids in queue order, repeats allowed) to
        host memory before their turn, as far as the host tier has room beyond the slots.
        Reads `queued` only as far as that room reaches."""
        room = max(1, self.cfg.max_cpu_loras - self.cfg.max_loras)
        seen: set[int] = set()
        for lora_id in queued:
            if room <= 0:
                break
            if lora_id in seen or lora_id in self._slot_lru or lora_id not in self.registered:
                continue
            seen.add(lora_id)
            room -= 1
            if lora_id in self._host:
                self._host.move_to_end(lora_id)  # keep it until its turn
            elif lora_id not in self.loader:
                self.stats.host_misses += 1
                self.loader.submit(self.registered[lora_id])

    def poll_loads(self) -> dict[int, LoRAError]:
        """Move finished loads into the host tier; returns the adapters that failed."""
        failed: dict[int, LoRAError] = {}
        for lora_id, result in self.loader.poll().items():
            if lora_id not in self.registered:
                continue  # removed while loading
            if isinstance(result, LoRAError):
                self.stats.load_failures += 1
                failed[lora_id] = result
            elif result.added_tokens is not None and lora_id not in self.tokenizers:
                # a hub id registered unread: its requests were encoded without its tokens
                self.stats.load_failures += 1
                failed[lora_id] = LoRAError(
                    f"LoRA adapter {self.registered[lora_id].lora_name!r} adds tokens to the "
                    "vocabulary, so its tokenizer is needed before its requests are encoded: "
                    "load it first (add_lora, /v1/load_lora_adapter) or give a local path")
            else:
                self._put_host(result)
        return failed

    def _put_host(self, lora: PackedLoRA) -> None:
        self._host[lora.lora_int_id] = lora
        self._host.move_to_end(lora.lora_int_id)
        while len(self._host) > self.cfg.max_cpu_loras:
            evicted, _ = self._host.popitem(last=False)
            logger.debug("evicted adapter %d from the host cache", evicted)

    @property
    def num_host(self) -> int:
        return len(self._host)

    @property
    def num_slots_used(self) -> int:
        return len(self._slot_lru)

    # ---- device slots -----------------------------------------------------------------
    def activate(self, lora_ids: set[int], keep: set[int] = frozenset()
                 ) -> tuple[dict[int, int], dict[int, LoRAError]]:
        """Give every adapter of the step a device slot.

        The scheduler admits only ready adapters (is_ready), so this copies host -> slot
        and never reads from disk. Returns (id -> slot, id -> error for adapters that are
        no longer registered or loaded); the caller fails the requests of the latter.
        Never evicts an adapter of this step, one in `keep` (the running set, whose
        sequences may sit out a step) or a pinned one.
        """
        keep = keep | lora_ids
        failed: dict[int, LoRAError] = {}
        for lora_id in lora_ids:
            if lora_id in self._slot_lru:
                self._slot_lru.move_to_end(lora_id)
                self.stats.slot_hits += 1
                continue
            lora = self._host.get(lora_id)
            if lora is None:
                failed[lora_id] = LoRAError(
                    f"adapter id {lora_id} is not registered" if lora_id not in self.registered
                    else f"adapter id {lora_id} was scheduled but is not loaded (bug)")
                continue
            self._host.move_to_end(lora_id)
            self.stats.host_hits += 1
            slot = self._free_slot(keep)
            self._load_slot(slot, lora)
            self._slot_lru[lora_id] = slot
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

    def _load_slot(self, slot: int, lora: PackedLoRA) -> None:
        stream = self._copy_stream
        if stream is not None:  # the slot was last read by compute: start after it
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for name, layer in self.layers.items():
                packed = lora.layers.get(name)
                if packed is None:
                    layer.reset_lora(slot)
                else:
                    layer.set_packed(slot, *packed)
            if self.extra_vocab is not None:
                added = lora.added_tokens
                if added is None:
                    self.extra_vocab.reset(slot)
                else:
                    self.extra_vocab.set(slot, added.input_embeddings, added.output_embeddings)
            if self.full_vocab is not None:
                self.full_vocab.set(slot, lora.full_vocab)
        if stream is not None:  # the next forward reads the slot: wait for the copies
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.lora_index_to_id[slot] = lora.lora_int_id
        if lora.rope_factor != 1.0:
            self.rope_offsets[lora.lora_int_id] = self._rope_rows[lora.rope_factor]
        else:
            self.rope_offsets.pop(lora.lora_int_id, None)
        if lora.dora or lora.bias:
            self.eager_slots.add(slot)
        else:
            self.eager_slots.discard(slot)

    def _reset_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.reset_lora(slot)
        if self.extra_vocab is not None:
            self.extra_vocab.reset(slot)
        if self.full_vocab is not None:
            self.full_vocab.reset(slot)
        self.lora_index_to_id[slot] = None
        self.eager_slots.discard(slot)

    def num_unpinned_capacity(self, batch: set[int]) -> int:
        """How many distinct adapters a batch may hold: slots not held by pinned outsiders."""
        return self.cfg.max_loras - len(self.pinned - batch)

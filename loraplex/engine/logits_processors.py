"""Custom logits processors (vLLM V1's): loading them, and the persistent row indices
they see.

loraplex builds each step's sampling rows afresh, in its own order; a vLLM processor
expects a persistent batch, where a request keeps its row from step to step. This file
keeps that batch: each step's sampled sequences are diffed against the last step's
(gone: removed; new: added, into the lowest empty index first; then the batch condensed
by moving its last rows into the holes, as vLLM's InputBatch does), the processors get
that BatchUpdate, and their `apply` sees the logits permuted into the batch's order.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import torch

from loraplex.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

if TYPE_CHECKING:
    from loraplex.config import EngineConfig
    from loraplex.engine.sequence import Sequence
    from loraplex.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "loraplex.logits_processors"  # vLLM's "vllm.logits_processors"
POOLING_REFUSES = "pooling models do not support custom logits processors"
SPEC_DECODE_REFUSES = ("custom logits processors are not supported when speculative "
                       "decoding is enabled")


def resolve_logits_processor(spec: type | str) -> type[LogitsProcessor]:
    """A LogitsProcessor subclass, or its name: "pkg.mod:Class" (vLLM's form; the part
    after ":" may be dotted) or "pkg.mod.Class"."""
    if isinstance(spec, str):
        module_name, sep, qualname = spec.partition(":")
        if not sep:
            module_name, _, qualname = spec.rpartition(".")
        if not module_name or not qualname:
            raise ValueError(f"logits processor {spec!r}: give it as 'pkg.module:Class'")
        try:
            obj = importlib.import_module(module_name)
            for attr in qualname.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load logits processor {spec!r}: {e}") from e
    else:
        obj = spec
    if not isinstance(obj, type) or not issubclass(obj, LogitsProcessor):
        raise ValueError(f"logits processor {spec!r} is not a subclass of loraplex.v1.sample."
                         "logits_processor.LogitsProcessor")
    return obj


def load_logits_processors(specs: Iterable[type | str] | None, runner: str,
                           speculative: bool) -> list[type[LogitsProcessor]]:
    """The installed plugins' classes (entry points of ENTRY_POINT_GROUP), then the given
    ones; the given ones are refused on a pooling runner or with speculative decoding
    (where plugins are skipped), as vLLM refuses them."""
    specs = list(specs or [])
    if runner == "pooling" or speculative:
        if specs:
            raise ValueError(POOLING_REFUSES if runner == "pooling" else SPEC_DECODE_REFUSES)
        return []
    classes = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            classes.append(resolve_logits_processor(ep.load()))
        except Exception as e:
            raise ValueError(f"logits processor plugin {ep.name!r} ({ep.value}): {e}") from e
    return classes + [resolve_logits_processor(s) for s in specs]


class LogitsProcessorBatch:
    """The processors of one engine, and the persistent batch of rows they see."""

    def __init__(self, classes: list[type[LogitsProcessor]], config: EngineConfig,
                 device: torch.device) -> None:
        self.classes = classes
        procs = [cls(config, device, device.type == "cuda") for cls in classes]
        self.non_argmax_invariant = [p for p in procs if not p.is_argmax_invariant()]
        self.argmax_invariant = [p for p in procs if p.is_argmax_invariant()]
        self.processors = procs
        self.device = device
        self.slots: list[Sequence] = []  # batch index -> its sequence
        self.order: torch.Tensor | None = None  # batch index -> the sampler's row; None: same

    def validate(self, params: SamplingParams) -> None:
        """Each processor's validate_params (ValueError: the request is refused)."""
        for cls in self.classes:
            cls.validate_params(params)

    def update(self, seqs: list[Sequence]) -> None:
        """This step's sampled sequences, in the sampler's row order: diff them against
        the batch, tell every processor (update_state), keep the row permutation."""
        present = set(seqs)
        slots: list[Sequence | None] = [s if s in present else None for s in self.slots]
        holes = [i for i, s in enumerate(slots) if s is None]
        known = {s for s in slots if s is not None}
        added = []
        for seq in seqs:
            if seq in known:
                continue
            index = holes.pop(0) if holes else len(slots)
            if index == len(slots):
                slots.append(seq)
            else:
                slots[index] = seq
            prompt = (None if seq.images is not None and seq.images.prompt_embeds
                      else seq.prompt_token_ids)
            added.append((index, seq.params, prompt, seq.live_output_token_ids))
        removed = list(holes)  # left empty: the batch condenses into them
        moved = []
        while holes:
            while slots and slots[-1] is None:
                slots.pop()
            hole = holes.pop(0)
            if hole >= len(slots):
                break
            slots[hole] = slots.pop()
            moved.append((len(slots), hole, MoveDirectionality.UNIDIRECTIONAL))
        self.slots = [s for s in slots if s is not None]
        changed = added or removed or moved
        update = BatchUpdate(len(self.slots), removed, added, moved) if changed else None
        for proc in self.processors:
            proc.update_state(update)
        row_of = {s: i for i, s in enumerate(seqs)}
        order = [row_of[s] for s in self.slots]
        self.order = (None if order == list(range(len(order)))
                      else torch.tensor(order, dtype=torch.long).to(self.device))

    def apply(self, logits: torch.Tensor, argmax_invariant: bool) -> torch.Tensor:
        """[rows, vocab] in the sampler's row order -> the processed logits, same order;
        the input tensor is kept (the processors may write in place on their copy)."""
        procs = self.argmax_invariant if argmax_invariant else self.non_argmax_invariant
        if not procs or logits.shape[0] == 0:
            return logits
        batch = logits.clone() if self.order is None else logits.index_select(0, self.order)
        for proc in procs:
            batch = proc.apply(batch)
        if self.order is None:
            return batch
        return torch.empty_like(batch).index_copy_(0, self.order, batch)

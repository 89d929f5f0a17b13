"""State slots of a hybrid model's Mamba2 mixers (layers/mamba2.py), LFM2's short
convolutions (layers/short_conv.py), gated DeltaNet layers (layers/gated_delta_net.py:
Qwen3-Next's, Qwen3.5's; Kimi-Linear's KDA, layers/kda.py) or Mamba-1 mixers
(layers/mamba1.py: Mamba's, FalconMamba's, Jamba's).

A running sequence holds one slot: per mixer layer its conv state [conv_dim, d_conv - 1]
and SSM state ([heads, head_dim, d_state]; a DeltaNet's [v heads, d_k, d_v]; a short
convolution: its conv window [hidden, L_cache - 1] alone; each mixer names its own,
`slot_state_shapes`), in tensors preallocated for max_num_seqs slots (the KV cache's
budget pays for them first: ModelRunner._num_kv_blocks). A slot is taken
at a sequence's first step and given back when it finishes, is aborted or is preempted
(Scheduler.release): a preempted sequence recomputes from its prompt, its first chunk
starting the state from zeros again. With prefix caching, a sequence admitted after a
cached prefix gets the state snapshot of that prefix copied into its new slot, and its
first chunk continues from it; prefill chunks and decode steps that end on a block
boundary keep one (worker/state_snapshots.py). Both states are kept in the
model's dtype, as vLLM keeps them by default (mamba_ssm_cache_dtype "auto"); the scan
itself runs in fp32.
"""

from __future__ import annotations

import math

import torch

from loraplex.engine.sequence import Sequence
from loraplex.layers.gated_delta_net import DeltaRuleMixer
from loraplex.layers.mamba1 import Mamba1Mixer
from loraplex.layers.mamba2 import Mamba2Mixer, MambaBatch
from loraplex.layers.short_conv import ShortConv
from loraplex.worker.state_snapshots import StateSnapshots

# the layers whose state is per sequence (each names its states: `slot_state_shapes`)
# (DeltaRuleMixer: gated DeltaNets and Kimi-Linear's KDA layers)
STATE_LAYERS = (Mamba2Mixer, ShortConv, DeltaRuleMixer, Mamba1Mixer)
StateMixer = Mamba2Mixer | ShortConv | DeltaRuleMixer | Mamba1Mixer


def state_bytes_per_slot(mixers: list[StateMixer], dtype: torch.dtype) -> int:
    """One sequence's states over every mixer layer."""
    elements = sum(math.prod(shape) for mixer in mixers
                   for shape in mixer.slot_state_shapes().values())
    return elements * torch.tensor([], dtype=dtype).element_size()


class MambaStateCache:
    def __init__(self, mixers: list[StateMixer], num_slots: int, dtype: torch.dtype,
                 device: torch.device, snapshots: StateSnapshots | None = None,
                 block_size: int = 0) -> None:
        for mixer in mixers:
            for name, shape in mixer.slot_state_shapes().items():
                setattr(mixer, name, torch.zeros(num_slots, *shape, dtype=dtype,
                                                 device=device))
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() takes the lowest
        self.slot_of: dict[int, int] = {}  # seq_id -> its slot
        self.device = device
        # prefix caching: states at block boundaries, keyed by the prefix's block hash
        self.snapshots = snapshots
        self.block_size = block_size
        # seq_id -> the key of its latest snapshot past its prompt (superseded by its next)
        self.generated_snapshot: dict[int, bytes] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def slot(self, seq: Sequence) -> int:
        """The sequence's slot, taken now if it has none (the scheduler runs at most
        max_num_seqs sequences, as many as there are slots)."""
        slot = self.slot_of.get(seq.seq_id)
        if slot is None:
            if not self.free_slots:
                raise RuntimeError("no free Mamba state slot: more running sequences than "
                                   "max_num_seqs")
            slot = self.slot_of[seq.seq_id] = self.free_slots.pop()
        return slot

    def save_snapshot(self, seq: Sequence, key: bytes) -> None:
        """The sequence's state now (its computed tokens, a block boundary) as the state
        after the prefix `key` (BlockManager.commit). Past its prompt (decode steps, or a
        preempted sequence's recompute of its output), it supersedes the sequence's
        previous snapshot there (StateSnapshots.save)."""
        slot = self.slot_of.get(seq.seq_id)
        if self.snapshots is None or slot is None:
            return
        if seq.num_computed_tokens <= seq.num_prompt_tokens:
            self.snapshots.save(key, slot)
            return
        self.snapshots.save(key, slot, supersedes=self.generated_snapshot.get(seq.seq_id))
        self.generated_snapshot[seq.seq_id] = key

    def release(self, seq: Sequence) -> None:
        """The sequence left the running set (finished, aborted, preempted): its latest
        snapshot stays an ordinary entry (the one a chat's next turn hits)."""
        self.generated_snapshot.pop(seq.seq_id, None)
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def batch(self, prefill: list[Sequence], lens: list[int], decode: list[Sequence],
              decode_start: int) -> MambaBatch:
        """The step's rows per sequence and their slots: prefill chunks back to back from
        row 0 (fresh: the chunk starts at the prompt's first token; a sequence's first
        chunk after a cached prefix starts from the prefix's snapshot, copied into its
        slot now), then one decode row each from `decode_start`."""
        spans, first = [], 0
        for seq, n in zip(prefill, lens, strict=True):
            start, new = seq.num_computed_tokens, seq.seq_id not in self.slot_of
            slot = self.slot(seq)
            if new and start:  # admitted after a cached prefix (BlockManager.allocate)
                if self.snapshots is None:
                    raise RuntimeError("a hybrid sequence starts mid-prompt without state "
                                       "snapshots")
                self.snapshots.load(seq.block_hashes[start // self.block_size - 1], slot)
            spans.append((first, first + n, slot, start == 0))
            first += n
        slots = torch.tensor([self.slot(s) for s in decode], dtype=torch.long,
                             device=self.device) if decode else None
        return MambaBatch(spans, decode_start, slots)

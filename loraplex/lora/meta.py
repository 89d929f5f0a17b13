"""Per-step LoRA metadata: which adapter slot each token uses, tokens grouped by slot.

Built once per step, shared by every wrapped layer. The tokens that use an adapter are
sorted by slot into segments (one per active slot, SGMV's layout; in a decode step a
segment is the sequences sharing an adapter) and each segment is cut into tiles of at
most `block_m` rows. A Triton program takes a whole tile: one slot, one rank, one read
of that slot's weights for up to `block_m` tokens.

Device tensors (all views of one int32 buffer, refilled in place by `prepare`, so a CUDA
graph captured at `max_tokens` tokens replays any later step that fits; the only host
ints a kernel launch sees are the upper bounds `max_tokens` and `max_tiles`):

    token_lora_indices [max_tokens]  slot of token i, -1 = base (untouched)
    sorted_token_ids   [max_tokens]  token rows with an adapter, grouped by slot
    tile_slot, tile_start, tile_len  [max_tiles]  tile t = rows
                       sorted_token_ids[tile_start[t] : tile_start[t] + tile_len[t]], all of slot tile_slot[t]
    num_tiles          [1]           tiles in use; programs past it do nothing

Host lists (`active_slot_list`, `rank_buckets`) serve the cheap per-layer checks and the
torch path. For a graph: allocate at the captured batch size, set `skip_unused_layers =
False`, capture, then `prepare(new slots)` before each replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _owner(counts: torch.Tensor) -> torch.Tensor:
    """[sum(counts)]: i for each of the counts[i] items of group i (repeat_interleave, which
    on the CPU starts threads even for a few items)."""
    ends = counts.cumsum(0)
    return torch.searchsorted(ends, torch.arange(int(ends[-1]) if len(ends) else 0), right=True)


@dataclass(frozen=True)
class RankBucket:
    """Active slots of similar rank, padded into one [G', Tmax] batch for the torch path.

    Row g of the batch holds tokens of one slot; a long segment may span several rows
    (`_rows_per_group`), so a slot can repeat in `slots`."""

    rank: int  # the largest real rank in the bucket: columns beyond it are never read
    slots: torch.Tensor  # [G'] long: the slot of each row
    slot_slice: slice | None  # the same slots as a slice when evenly spaced (a view, no copy)
    gather: torch.Tensor  # [G', Tmax] long: token row of each padded position (pads repeat one)
    scatter_pos: torch.Tensor  # [N] long: flat padded positions that hold a real token
    scatter_tok: torch.Tensor  # [N] long: the token row of each of those positions
    # the slot when every token of the step uses it (then the batch is the tokens as they
    # are: no gather, no scatter); None otherwise
    whole_batch_slot: int | None = None


class LoRABatchMeta:
    def __init__(self, max_tokens: int, max_loras: int, device: torch.device,
                 block_m: int = 16) -> None:
        """Preallocate for any step of <= max_tokens tokens over <= max_loras slots."""
        self.max_tokens, self.block_m, self.device = max_tokens, block_m, torch.device(device)
        # sum_g ceil(n_g / block_m) < max_tokens / block_m + (number of segments)
        self.max_tiles = -(-max_tokens // block_m) + min(max_tokens, max_loras)
        self._sizes = [max_tokens, max_tokens, self.max_tiles, self.max_tiles, self.max_tiles, 1]
        self._buf = torch.zeros(sum(self._sizes), dtype=torch.int32, device=self.device)
        (self.token_lora_indices, self.sorted_token_ids, self.tile_slot, self.tile_start,
         self.tile_len, self.num_tiles) = self._buf.split(self._sizes)
        on_gpu = self.device.type == "cuda"  # stage in pinned host memory, copy once a step
        self._host = (torch.zeros(len(self._buf), dtype=torch.int32, pin_memory=True) if on_gpu
                      else self._buf)
        self._copied = torch.cuda.Event() if on_gpu else None
        self.num_tokens = 0
        self.active_slot_list: list[int] = []
        # Layers skip their op when no active slot has weights there: a host decision that
        # a CUDA graph would bake in, so a graph runner sets this False before capture.
        self.skip_unused_layers = True

    @classmethod
    def make(cls, token_lora_slots: list[int], device: torch.device) -> LoRABatchMeta:
        """A meta sized for exactly this step (no graph): token_lora_slots[i] = slot or -1."""
        n = len(token_lora_slots)
        counts: dict[int, int] = {}
        for s in token_lora_slots:
            counts[s] = counts.get(s, 0) + 1
        longest = max((c for s, c in counts.items() if s >= 0), default=0)
        block_m = 16 if longest <= 16 else 64  # decode: 1-token tiles; prefill: fat tiles
        meta = cls(max(n, 1), sum(s >= 0 for s in counts), device, block_m)
        return meta.prepare(token_lora_slots)

    @property
    def no_lora(self) -> bool:
        return not self.active_slot_list

    def prepare(self, token_lora_slots: list[int]) -> LoRABatchMeta:
        """Refill every buffer in place for a new step (host work, one host->device copy)."""
        n = len(token_lora_slots)
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens > the {self.max_tokens} this meta was sized for")
        slots = torch.tensor(token_lora_slots, dtype=torch.int32).reshape(n)
        order = torch.argsort(slots, stable=True)
        order = order[int((slots < 0).sum()):]  # drop base tokens (slot -1 sorts first)
        active, counts = torch.unique_consecutive(slots[order], return_counts=True)
        starts = counts.cumsum(0) - counts
        seg, tile_start, tile_len = self._tiles(starts, counts)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the staging buffer
        idx, srt, t_slot, t_start, t_len, num = self._host.split(self._sizes)
        for view, values, fill in ((idx, slots, -1), (srt, order, 0), (t_slot, active[seg], -1),
                                   (t_start, tile_start, 0), (t_len, tile_len, 0)):
            view.fill_(fill)
            view[:len(values)] = values
        num[0] = len(seg)
        if self._copied is not None:
            self._buf.copy_(self._host, non_blocking=True)
            self._copied.record()
        self.num_tokens = n
        self.active_slot_list = active.tolist()
        self._segments = (order, starts, counts)
        self._buckets: dict[tuple[int, ...], list[RankBucket]] = {}
        return self

    def _tiles(self, starts: torch.Tensor, counts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut segments into tiles of <= block_m rows: per tile its segment, first row, rows."""
        bm = self.block_m
        per_seg = (counts + bm - 1) // bm
        seg = _owner(per_seg)
        offset = (torch.arange(len(seg)) - (per_seg.cumsum(0) - per_seg)[seg]) * bm
        return seg, starts[seg] + offset, torch.clamp(counts[seg] - offset, max=bm)

    def rank_buckets(self, slot_ranks: list[int]) -> list[RankBucket]:
        """Active slots grouped by rank class (ceil to a power of 2), for the torch path.

        `slot_ranks[s]` = real rank in slot s for the calling layer (0 = no weights: its
        tokens are skipped). Memoized per step: layers with the same ranks share the result.
        """
        key = tuple(slot_ranks[s] for s in self.active_slot_list)
        if key not in self._buckets:
            self._buckets[key] = self._make_buckets(key)
        return self._buckets[key]

    def _make_buckets(self, ranks: tuple[int, ...]) -> list[RankBucket]:
        order, starts, counts = self._segments
        by_class: dict[int, list[int]] = {}
        for g, r in enumerate(ranks):
            if r > 0:
                by_class.setdefault(1 << (r - 1).bit_length(), []).append(g)
        buckets = []
        for groups in by_class.values():
            g = torch.tensor(groups)
            n = counts[g]
            tile = _rows_per_group(n)
            pieces = (n + tile - 1) // tile  # a long segment becomes several rows of the batch
            owner = _owner(pieces)
            first = (pieces.cumsum(0) - pieces)[owner]
            offset = (torch.arange(len(owner)) - first) * tile  # piece's first row in its segment
            length = torch.clamp(n[owner] - offset, max=tile)
            j = torch.arange(int(length.max()))
            gather = order[starts[g][owner][:, None] + offset[:, None]
                           + torch.minimum(j, length[:, None] - 1)]  # [G', Tmax]
            pos = (j < length[:, None]).flatten().nonzero().squeeze(1)
            slots = [self.active_slot_list[i] for i in groups]
            step = slots[1] - slots[0] if len(slots) > 1 else 1
            even = len(owner) == len(groups) and all(b - a == step
                                                     for a, b in zip(slots, slots[1:]))
            dev = self.device
            buckets.append(RankBucket(
                rank=max(ranks[i] for i in groups),
                slots=torch.tensor(slots, device=dev)[owner.to(dev)],
                slot_slice=slice(slots[0], slots[-1] + 1, step) if even else None,
                gather=gather.to(dev), scatter_pos=pos.to(dev),
                scatter_tok=gather.flatten()[pos].to(dev),
                whole_batch_slot=slots[0] if len(groups) == 1 and int(n[0]) == self.num_tokens
                else None))
        return buckets


def _rows_per_group(counts: torch.Tensor) -> int:
    """Longest row of the padded [G', Tmax] batch (rows per piece of a segment).

    Padding every segment to the longest one costs G x max(n) rows: a hot adapter with a
    few prompts beside 20 one-prompt adapters would multiply the work by ~5. Cut into
    pieces of the mean length instead, the batch has G' <= 2G rows and <= 2 sum(n) + G
    padded positions, but each piece copies its slot's weights (no view of the slot
    buffers). A copied weight row costs about as much as `_WEIGHT_COPY_ROWS` token rows
    on the CPU, so decode steps (a token or a few per slot) are not cut."""
    total, longest = int(counts.sum()), int(counts.max())
    tile = -(-total // len(counts))
    pieces = int(((counts + tile - 1) // tile).sum())
    saved = len(counts) * longest - pieces * tile
    return tile if saved > _WEIGHT_COPY_ROWS * pieces else longest


_WEIGHT_COPY_ROWS = 8

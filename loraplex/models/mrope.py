"""Qwen2-VL's multimodal rotary positions (M-RoPE): each token has a (temporal, height,
width) position, and the rotary frequencies of each head are split into `mrope_section`
pieces rotated by one axis each (layers/rotary.py).

A text token's position is the same on all three axes, one past the previous token's
largest; an image's placeholders take (t, h, w) grid positions over its merged patch
grid, all offset by the position where the image starts; a video's the same over its
temporal patches, its t axis spaced by its time interval (Qwen2.5-VL: seconds per
temporal patch x tokens_per_second). The text after an image or video so continues
from one past its largest position (for an image: its start plus the grid's longest
side), not from its token count: a prompt with images ends `delta` = (largest position
+ 1) - (its length) away from where
1-D positions would, and every later token (decode) is at its index + delta on all three
axes, which is exactly a 1-D rope at that shifted position (HF's `get_rope_index` and
`mrope_position_deltas`). A prompt without images has delta 0 and 1-D positions.

Which axis rotates which frequency (`frequency_axes`): Qwen2-VL gives the axes contiguous
sections (the first `mrope_section[0]` frequencies by t, the next by h, then w); Qwen3-VL
interleaves them (t, h, w, t, h, w, ...: frequency i by h where i % 3 == 1 and i < 3 x
mrope_section[1], by w where i % 3 == 2 and i < 3 x mrope_section[2], else by t), so
every axis spans the high and the low frequencies (HF's
Qwen3VLTextRotaryEmbedding.recomposition_frequencies). The positions are the same rule
for both; Qwen3-VL's get_rope_index differs only for videos, whose temporal patches are
separated by timestamp text: each is given here as a (1, h, w) grid of its own
(engine/qwen3_videos.py).
"""

from __future__ import annotations

import torch


def frequency_axes(section: tuple[int, ...], interleaved: bool = False) -> torch.Tensor:
    """[sum(section)]: the axis (0: t, 1: h, 2: w) whose position rotates each frequency."""
    if not interleaved:
        return torch.cat([torch.full((n,), i % 3) for i, n in enumerate(section)])
    axis = torch.zeros(sum(section), dtype=torch.long)
    for a in (1, 2):  # h, w on every third frequency from a, over 3 x their section
        axis[a:3 * section[a]:3] = a
    return axis


def mrope_positions(ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]],
                    merge_size: int, video_token_id: int | None = None,
                    video_grids: list[tuple[int, int, int]] = (),
                    time_intervals: list[float] = ()) -> tuple[torch.Tensor, int]:
    """([3, len(ids)] positions, delta) of a prompt whose runs of `image_token_id` are the
    images of `grids` (patch grids (t, h, w)), in order, and whose runs of
    `video_token_id` the videos of `video_grids`, in order. A video's temporal patch i is
    at i x its `time_intervals` entry (Qwen2.5-VL: tokens_per_second x
    second_per_grid_t, in fp32 and truncated as HF's get_rope_index computes it;
    Qwen2-VL: 1) past the start; the text after any image or video continues from its
    largest position + 1, the rule of Qwen's reference code, vLLM and transformers <=
    5.2, which the models were trained with (later transformers continue from the start
    + the longest merged side: the same for images, not for a video whose temporal
    positions reach further, whose text then overlaps it)."""
    pieces: list[torch.Tensor] = []
    runs = {image_token_id: (iter(grids), iter([1.0] * len(grids)))}
    if video_token_id is not None:
        intervals = list(time_intervals) or [1.0] * len(video_grids)
        runs[video_token_id] = (iter(video_grids), iter(intervals))
    pos, i = 0, 0
    while i < len(ids):
        if ids[i] not in runs:
            j = i
            while j < len(ids) and ids[j] not in runs:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            items, steps = runs[ids[i]]
            t, h, w = next(items)
            step = torch.tensor(next(steps), dtype=torch.float32)
            h, w = h // merge_size, w // merge_size
            temporal = (torch.arange(t) * step).long()
            grid = torch.stack(torch.meshgrid(temporal, torch.arange(h), torch.arange(w),
                                              indexing="ij")).reshape(3, -1)
            pieces.append(grid + pos)
            j = i + grid.shape[1]
            pos += int(grid.max()) + 1
        i = j
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - len(ids)

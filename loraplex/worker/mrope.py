"""The step's M-RoPE positions (Qwen2-VL, models/mrope.py) from each sequence's
precomputed ones: a chunk takes its slice of its prompt's [3, prompt] positions, and any
token past the prompt (a recompute after preemption, speculative drafts) is text at its
index + the prompt's delta on all three axes. Sequences without images keep their 1-D
positions on all three axes. Decode rows stay 1-D (p + delta: the same rotation), so the
decode path and its CUDA graphs are the plain ones."""

from __future__ import annotations

import torch

from loraplex.engine.sequence import Sequence


def mrope_delta(seq: Sequence) -> int:
    """How far `seq`'s positions after its prompt are from its token indices."""
    return seq.images.mrope_delta if seq.images is not None else 0


def mrope_step_positions(seqs: list[Sequence], starts: list[int], lens: list[int],
                         flat: list[int]) -> torch.Tensor:
    """[3, T]: the step's prefill rows (`lens[i]` tokens of sequence i from `starts[i]`),
    `flat` the 1-D positions prepare_prefill gave them."""
    out = torch.tensor(flat, dtype=torch.long).expand(3, -1).clone()
    first = 0
    for seq, start, n in zip(seqs, starts, lens):
        images = seq.images
        if images is not None and images.mrope is not None:
            prompt = images.mrope.shape[1]
            end = min(start + n, prompt)
            if start < end:
                out[:, first:first + end - start] = images.mrope[:, start:end]
            if start + n > prompt:  # past the prompt: text, shifted by the delta
                lo = max(start, prompt)
                out[:, first + lo - start:first + n] = torch.arange(
                    lo, start + n) + images.mrope_delta
        first += n
    return out

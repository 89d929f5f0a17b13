"""Pooling a prompt's final hidden states (after the final norm) into one embedding.

A prompt may be prefilled in several chunks (chunked prefill), so pooling is a running
state per sequence, fed each chunk's rows as they come out of the model: MEAN keeps an
fp32 sum and a count (every token's hidden state is needed), LAST the latest chunk's last
row, CLS the first chunk's first row. Nothing of a chunk is kept beyond that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PoolingState:
    """One sequence's pooling in progress (Sequence.pooling)."""

    def __init__(self, pooling_type: str, position: int | None = None) -> None:
        """`position`: LAST pools that position's row instead of the last one (a
        classifier's last non-pad token, as HF's)."""
        self.pooling_type = pooling_type
        self.position = position
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._row: torch.Tensor | None = None  # LAST / CLS

    def add(self, hidden: torch.Tensor, start: int) -> None:
        """A chunk's rows [n, hidden] for positions start..start+n-1. A chunk at position
        0 starts over (a sequence recomputed after a preemption)."""
        if start == 0:
            self._sum, self._count, self._row = None, 0, None
        if self.pooling_type == "MEAN":
            chunk = hidden.float().sum(0)
            self._sum = chunk if self._sum is None else self._sum + chunk
            self._count += hidden.shape[0]
        elif self.pooling_type == "LAST" and self.position is not None:
            if start <= self.position < start + hidden.shape[0]:
                self._row = hidden[self.position - start].float().clone()
        elif self.pooling_type == "LAST":
            self._row = hidden[-1].float().clone()
        elif start == 0:  # CLS
            self._row = hidden[0].float().clone()

    def pooled(self) -> torch.Tensor:
        """The pooled hidden state [hidden] in fp32 (all chunks added)."""
        if self.pooling_type == "MEAN":
            assert self._sum is not None
            return self._sum / self._count
        assert self._row is not None
        return self._row


def embedding_head(pooled: torch.Tensor, normalize: bool, dimensions: int | None
                   ) -> torch.Tensor:
    """vLLM's embedding head: matryoshka truncation first, then L2 normalization (so a
    truncated embedding is unit length again); on the CPU, fp32."""
    if dimensions is not None:
        pooled = pooled[..., :dimensions]
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled.cpu()

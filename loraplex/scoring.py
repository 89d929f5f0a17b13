"""Scoring text pairs with an embedding model, as vLLM scores them with a bi-encoder
(`LLM.score`, `/score`, `/rerank`): each text is embedded (under the request's adapter),
and a pair's score is the cosine similarity of its two embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pair_indices(num_first: int, num_second: int) -> list[tuple[int, int]]:
    """Which texts are scored together, vLLM's rule: 1:1, 1:N (the one first text against
    each second one) or N:N (pairwise, in order)."""
    if not num_first or not num_second:
        raise ValueError("there is nothing to score: both sides need at least one text")
    if num_first == 1:
        return [(0, j) for j in range(num_second)]
    if num_first != num_second:
        raise ValueError(f"Input lengths must be either 1:1, 1:N or N:N, got "
                         f"{num_first}:{num_second}")
    return [(i, i) for i in range(num_first)]


def cosine_scores(first: list[torch.Tensor], second: list[torch.Tensor],
                  pairs: list[tuple[int, int]]) -> list[float]:
    """The cosine similarity of each pair's embeddings, in fp32."""
    a = torch.stack([first[i].float() for i, _ in pairs])
    b = torch.stack([second[j].float() for _, j in pairs])
    return F.cosine_similarity(a, b, dim=-1).tolist()

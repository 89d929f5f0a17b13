"""Scoring text pairs (`LLM.score`, `/score`, `/rerank`) as vLLM does.

A bi-encoder (an embedding model): each text is embedded (under the request's adapter),
and a pair's score is the cosine similarity of its two embeddings.
A cross-encoder (a classifier with one label, or a causal LM converted into one): each
pair is one input, its classifier's output (its logit through the score activation) the
score; `cross_encoder_ids` makes that input.
"""

from __future__ import annotations

from typing import Any

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


def cross_encoder_ids(tokenizer: Any, text_1: str, text_2: str, use_pad_token: bool,
                      max_length: int | None) -> list[int]:
    """A pair's token ids, vLLM's get_score_prompt: the tokenizer's own pair encoding
    (`text_pair`: its pair template, e.g. [CLS] a [SEP] b [SEP]; a tokenizer without one
    joins the two encodings) for a cross-encoder; for an LLM converted into a reranker
    (use_pad_token false) the two texts concatenated into one, which the user formats
    (e.g. Qwen3-Reranker's prompt around the query and the document). `max_length`:
    truncate_prompt_tokens, the tokenizer's truncation (longest first)."""
    kw: dict[str, Any] = ({"truncation": True, "max_length": max_length}
                          if max_length is not None else {})
    if use_pad_token:
        enc = tokenizer(text=text_1, text_pair=text_2, **kw)
    else:
        enc = tokenizer(text=text_1 + text_2, **kw)
    return list(enc["input_ids"])


def truncation_length(truncate: int | None, max_model_len: int) -> int | None:
    """truncate_prompt_tokens as the tokenizer's max_length (-1: max_model_len - 1, as
    PoolingParams reads it); None: no truncation."""
    if truncate is None:
        return None
    return max_model_len - 1 if truncate == -1 else truncate

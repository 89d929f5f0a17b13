"""Next-token sampling for a batch: penalties, temperature, top-k/top-p/min-p, greedy.

The math is batched over rows with per-row parameter tensors. Random rows use the
exponential race `argmax(p / q), q ~ Exp(1)`; a seeded row draws its q from its own
generator, so it samples the same tokens whatever else shares its batch.
Logprobs are reported from the raw logits (before penalties and temperature), as vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.outputs import Logprob
from loraplex.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    token_logprobs: list[float]
    logprobs: list[dict[int, Logprob] | None]


def _counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(rows), vocab, device=device)
    for i, ids in enumerate(rows):
        if ids:
            counts[i].index_add_(0, torch.tensor(ids, device=device),
                                 torch.ones(len(ids), device=device))
    return counts


class Sampler:
    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits.clone(), rows)
        tokens = self._sample(logits, rows)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        k = max((r.params.logprobs or 0) for r in rows)
        want = any(r.params.logprobs is not None for r in rows)
        top = raw_logprobs.topk(k, dim=-1) if want and k > 0 else None
        ranks = ((raw_logprobs > chosen[:, None]).sum(-1) + 1) if want else None
        token_list = tokens.tolist()
        chosen_list = chosen.tolist()
        out_logprobs: list[dict[int, Logprob] | None] = [None] * len(rows)
        if want:
            rank_list = ranks.tolist()
            top_vals = top.values.tolist() if top is not None else [[]] * len(rows)
            top_ids = top.indices.tolist() if top is not None else [[]] * len(rows)
            for i, r in enumerate(rows):
                if r.params.logprobs is None:
                    continue
                d = {token_list[i]: Logprob(chosen_list[i], rank_list[i])}
                for j in range(r.params.logprobs):
                    d.setdefault(top_ids[i][j], Logprob(top_vals[i][j], j + 1))
                out_logprobs[i] = d
        return SamplerOutput(token_list, chosen_list, out_logprobs)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        for i, r in enumerate(rows):  # min_tokens: no stopping yet
            p = r.params
            if len(r.output_token_ids) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, list(banned)] = float("-inf")
        rep = [r.params.repetition_penalty for r in rows]
        if any(v != 1.0 for v in rep):
            seen = _counts([r.prompt_token_ids + r.output_token_ids for r in rows], vocab,
                           device) > 0
            pen = torch.tensor(rep, device=device)[:, None]
            penalized = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(seen, penalized, logits)
        pres = [r.params.presence_penalty for r in rows]
        freq = [r.params.frequency_penalty for r in rows]
        if any(pres) or any(freq):
            counts = _counts([r.output_token_ids for r in rows], vocab, device)
            logits -= torch.tensor(freq, device=device)[:, None] * counts
            logits -= torch.tensor(pres, device=device)[:, None] * (counts > 0)
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        if all(r.params.greedy for r in rows):
            return greedy_tokens
        device = logits.device
        temps = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows],
                             device=device)
        logits = logits / temps[:, None]
        top_k = [r.params.top_k if r.params.top_k > 0 else logits.shape[1] for r in rows]
        if any(k < logits.shape[1] for k in top_k):
            kth = logits.sort(dim=-1, descending=True).values.gather(
                1, torch.tensor(top_k, device=device)[:, None] - 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = (cum - sorted_p) > torch.tensor(top_p, device=device)[:, None]
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        min_p = [r.params.min_p for r in rows]
        if any(min_p):
            floor = torch.tensor(min_p, device=device)[:, None] * probs.max(-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
        q = torch.empty_like(probs).exponential_()
        for i, r in enumerate(rows):
            if r.generator is not None:
                q[i] = torch.empty(probs.shape[1], device=device).exponential_(
                    generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        is_greedy = torch.tensor([r.params.greedy for r in rows], device=device)
        return torch.where(is_greedy, greedy_tokens, sampled)

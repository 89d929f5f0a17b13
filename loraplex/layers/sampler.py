"""Next-token sampling for a batch: penalties, temperature, top-k/top-p/min-p, greedy.

All math is batched over rows with per-row parameter tensors, on the logits' device; the
only device->host transfer is one `.tolist()` of a packed result at the end, and host
values reach the device through pinned memory without waiting for it (`_to_device`).
Random rows use the exponential race `argmax(p / q), q ~ Exp(1)`; a seeded row draws its q
from its own generator, so it samples the same tokens whatever else shares its batch.
Logprobs are reported from the raw logits (before penalties and temperature), as vLLM does.
Custom logits processors (engine/logits_processors.py) run as vLLM orders them: those that
may change the argmax after min_tokens and before penalties, the others after temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex.layers.rejection_sampler import accept_or_resample
from loraplex.outputs import Logprob
from loraplex.sampling_params import SamplingParams

if TYPE_CHECKING:
    from loraplex.engine.logits_processors import LogitsProcessorBatch
    from loraplex.engine.structured_output import TokenMask

# Columns of the per-row parameter tensor (one host->device copy per call).
_TEMP, _TOP_P, _TOP_K, _MIN_P, _REP, _PRES, _FREQ = range(7)


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # set when params.seed is not None, once per sequence
    bad_words: list[list[int]] = field(default_factory=list)  # params.bad_words' token ids


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    token_logprobs: list[float]  # raw logprob of the sampled token (cumulative_logprob)
    logprobs: list[dict[int, Logprob] | None]  # sampled + top-k tokens, where asked for
    # with draft tokens: per row, whether its token is its draft, accepted ([]: no drafts)
    accepted: list[bool] = field(default_factory=list)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device`. `torch.tensor(values, device=cuda)` would copy from pageable
    memory and wait for the device (the whole forward) first; from pinned memory the copy
    just queues behind it."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _token_counts(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] occurrence counts, built with one scatter instead of a loop over rows."""
    counts = torch.zeros(len(seqs), vocab, device=device)
    rows = [i for i, s in enumerate(seqs) for _ in s]
    if rows:
        index = _to_device([rows, [t for s in seqs for t in s]], torch.long, device)
        counts.index_put_((index[0], index[1]), torch.ones((), device=device), accumulate=True)
    return counts


class Sampler:
    """Turns a batch of logits into one token per row, plus the logprobs asked for."""

    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 token_mask: TokenMask | None = None,
                 draft_tokens: list[int] | None = None,
                 draft_probs: torch.Tensor | None = None,
                 processors: LogitsProcessorBatch | None = None) -> SamplerOutput:
        """`token_mask`: the tokens structured outputs allow next, for some rows.
        `draft_tokens`: speculative decoding, per row the draft token this position
        verifies (-1: none); the row's token is then the accepted draft or what replaces
        it, from exactly the distribution it would be sampled from without a draft
        (layers/rejection_sampler.py), and `accepted` says which. `draft_probs`: [rows,
        vocab] the distribution each row's draft was drawn from (a draft model's sampled
        drafts; None: deterministic drafts). `processors`: the engine's custom logits
        processors, their batch updated for these rows."""
        if not rows:
            return SamplerOutput([], [], [])
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} SamplingRows")
        logits = logits.float()  # every op below is out-of-place: the caller's tensor is kept
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        table = self._param_table(rows, logits.device)
        processed = self._process(logits, rows, table, processors)
        if token_mask is not None:
            processed = self._apply_token_mask(logits, processed, token_mask)
        drafts = (_to_device(draft_tokens, torch.long, logits.device)
                  if draft_tokens is not None and any(d >= 0 for d in draft_tokens) else None)
        tokens, accepted = self._sample(processed, rows, table, drafts, draft_tokens,
                                        draft_probs if drafts is not None else None,
                                        processors)
        return self._collect(raw_logprobs, tokens, [r.params.logprobs for r in rows], accepted)

    def token_logprobs(self, logits: torch.Tensor, tokens: list[int], num_logprobs: list[int]
                       ) -> list[dict[int, Logprob]]:
        """The logprob and rank of a given token per row, with the row's top-k: prompt
        logprobs (raw logits, like every logprob here)."""
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        return self._collect(raw_logprobs, chosen, list(num_logprobs)).logprobs

    def penalized_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """fp32 logits after min_tokens masking and penalties: what greedy rows argmax over
        and temperature then divides (exposed so tests can compare with HF's processors)."""
        logits = logits.float()
        return self._process(logits, rows, self._param_table(rows, logits.device))

    @staticmethod
    def _param_table(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
        """[B, 7] per-row parameters (see the _TEMP.. columns), one host->device copy."""
        return _to_device(
            [[r.params.temperature, r.params.top_p, r.params.top_k, r.params.min_p,
              r.params.repetition_penalty, r.params.presence_penalty,
              r.params.frequency_penalty] for r in rows],
            torch.float32, device)

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor,
                 processors: LogitsProcessorBatch | None = None) -> torch.Tensor:
        logits = self._mask_min_tokens(logits, rows)
        if processors is not None:  # vLLM: after min_tokens, before penalties
            logits = processors.apply(logits, argmax_invariant=False)
        logits = self._apply_penalties(logits, rows, table)
        return self._ban_tokens(self._add_logit_bias(logits, rows), rows)

    @staticmethod
    def _ban_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """-inf on what a row may not sample: every token outside its allowed_token_ids,
        and the last token of each bad word whose other tokens end the output so far
        (a one-token bad word: always), as vLLM bans them."""
        allowed = [(i, r.params.allowed_token_ids) for i, r in enumerate(rows)
                   if r.params.allowed_token_ids]
        banned = [(i, words[-1]) for i, r in enumerate(rows) for words in r.bad_words
                  if len(words) == 1 or r.output_token_ids[-(len(words) - 1):] == words[:-1]]
        if not allowed and not banned:
            return logits
        keep = torch.ones_like(logits, dtype=torch.bool)
        if allowed:
            idx = _to_device([i for i, _ in allowed], torch.long, logits.device)
            pairs = [(j, t) for j, (_, ids) in enumerate(allowed) for t in ids]
            only = torch.zeros(len(allowed), logits.shape[1], dtype=torch.bool,
                               device=logits.device)
            where = _to_device([[j for j, _ in pairs], [t for _, t in pairs]], torch.long,
                               logits.device)
            only[where[0], where[1]] = True
            keep = keep.index_copy(0, idx, only)
        if banned:
            where = _to_device([[i for i, _ in banned], [t for _, t in banned]], torch.long,
                               logits.device)
            keep[where[0], where[1]] = False
        return logits.masked_fill(~keep, float("-inf"))

    @staticmethod
    def _add_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """OpenAI's logit_bias: a per-request value added to chosen tokens' logits."""
        entries = [(i, t, b) for i, r in enumerate(rows) if r.params.logit_bias
                   for t, b in r.params.logit_bias.items()]
        if not entries:
            return logits
        rows_t, toks, vals = zip(*entries)
        index = _to_device([list(rows_t), list(toks)], torch.long, logits.device)
        return logits.index_put((index[0], index[1]),
                                _to_device(list(vals), logits.dtype, logits.device),
                                accumulate=True)

    # ---- logits processing -------------------------------------------------------------
    @staticmethod
    def _apply_token_mask(raw: torch.Tensor, processed: torch.Tensor,
                          token_mask: TokenMask) -> torch.Tensor:
        """Structured outputs' allowed tokens, on the constrained rows only. Where
        min_tokens banned all of them (the grammar is complete: only its stop token is
        left), the grammar wins over min_tokens for this step: that row's raw logits,
        masked. No host sync; the caller's tensors are kept."""
        idx = _to_device(token_mask.rows, torch.long, raw.device)
        masked = token_mask.apply(processed.index_select(0, idx))
        stuck = torch.isinf(masked).all(dim=1, keepdim=True)
        free = token_mask.apply(raw.index_select(0, idx))
        return processed.index_copy(0, idx, torch.where(stuck, free, masked))

    def _mask_min_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Before min_tokens are out, no token may end the sequence (eos, stop_token_ids)."""
        vocab = logits.shape[1]
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            if len(r.output_token_ids) >= p.min_tokens:
                continue
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if 0 <= t < vocab]
            row_idx += [i] * len(banned)
            tok_idx += banned
        if not row_idx:
            return logits
        index = _to_device([row_idx, tok_idx], torch.long, logits.device)
        return logits.index_put((index[0], index[1]),
                                torch.full((), float("-inf"), device=logits.device))

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow],
                         table: torch.Tensor) -> torch.Tensor:
        """Repetition (prompt + output, HF/vLLM style), presence and frequency (output)."""
        need_rep = any(r.params.repetition_penalty != 1.0 for r in rows)
        need_pf = any(r.params.presence_penalty or r.params.frequency_penalty for r in rows)
        if not (need_rep or need_pf):
            return logits
        vocab, device = logits.shape[1], logits.device
        out_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
        if need_rep:
            seen = (_token_counts([r.prompt_token_ids for r in rows], vocab, device)
                    + out_counts) > 0
            pen = table[:, _REP, None]
            penalized = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(seen, penalized, logits)
        if need_pf:
            logits = (logits - table[:, _FREQ, None] * out_counts
                      - table[:, _PRES, None] * (out_counts > 0).float())
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor,
                drafts: torch.Tensor | None = None, draft_list: list[int] | None = None,
                draft_probs: torch.Tensor | None = None,
                processors: LogitsProcessorBatch | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token of each row, and with drafts whether it is the row's accepted draft
        (greedy: the draft is the argmax)."""
        greedy_tokens = logits.argmax(dim=-1)
        greedy = [r.params.greedy for r in rows]
        greedy_accepts = greedy_tokens == drafts if drafts is not None else None
        if all(greedy):
            return greedy_tokens, greedy_accepts
        device, vocab = logits.device, logits.shape[1]
        is_greedy = _to_device(greedy, torch.bool, device)
        temps = torch.where(is_greedy, torch.ones((), device=device), table[:, _TEMP])
        logits = logits / temps[:, None]
        if processors is not None:  # the argmax-invariant ones: random rows only matter
            logits = processors.apply(logits, argmax_invariant=True)
        if any(0 < r.params.top_k < vocab for r in rows):
            logits = self._top_k(logits, rows, table)
        probs = torch.softmax(logits, dim=-1)
        if any(r.params.top_p < 1.0 for r in rows):
            probs = self._top_p(probs, table)
        if any(r.params.min_p > 0.0 for r in rows):
            floor = table[:, _MIN_P, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        q = self._exponential(probs, rows, greedy)
        if drafts is None:
            sampled = (probs / q).argmax(dim=-1)
            return torch.where(is_greedy, greedy_tokens, sampled), None
        uniform = self._uniform(rows, greedy, draft_list, device)
        sampled, accepted = accept_or_resample(probs, drafts, uniform, q, draft_probs)
        return (torch.where(is_greedy, greedy_tokens, sampled),
                torch.where(is_greedy, greedy_accepts, accepted))

    @staticmethod
    def _uniform(rows: list[SamplingRow], greedy: list[bool], drafts: list[int],
                 device: torch.device) -> torch.Tensor:
        """The acceptance draws in [0, 1) of the random rows verifying a draft: one shared
        draw, a seeded row's from its own generator (after its exponentials), so a seeded
        request's tokens depend only on its seed and its own drafts."""
        todo = [i for i, (g, d) in enumerate(zip(greedy, drafts)) if d >= 0 and not g]
        uniform = torch.zeros(len(rows), device=device)
        if any(rows[i].generator is None for i in todo):
            uniform.uniform_()
        for i in todo:
            if rows[i].generator is not None:
                uniform[i] = torch.rand((), generator=rows[i].generator, device=device)
        return uniform

    @staticmethod
    def _top_k(logits: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[1]
        k_max = max(r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows)
        k = table[:, _TOP_K].long()
        off = (k <= 0) | (k >= vocab)
        top = logits.topk(k_max, dim=-1).values
        kth = top.gather(1, (k.clamp(1, k_max) - 1)[:, None])
        kth = kth.masked_fill(off[:, None], float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))

    @staticmethod
    def _top_p(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Keep the smallest head whose mass reaches top_p (a token is dropped when the mass
        strictly above it already reaches top_p; the top token always survives)."""
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        top_p = table[:, _TOP_P, None]
        drop_sorted = (mass_before >= top_p) & (top_p < 1.0)  # top_p=1: rounding must not drop
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        return probs.masked_fill(drop, 0.0)

    @staticmethod
    def _exponential(probs: torch.Tensor, rows: list[SamplingRow],
                     greedy: list[bool]) -> torch.Tensor:
        """q ~ Exp(1): one shared draw for unseeded rows, each seeded row from its own
        generator (so its tokens do not depend on its batch neighbours)."""
        seeded = [i for i, r in enumerate(rows) if r.generator is not None and not greedy[i]]
        shared = any(r.generator is None and not g for r, g in zip(rows, greedy))
        q = torch.empty_like(probs)
        if shared:
            q.exponential_()
        else:
            q.fill_(1.0)
        for i in seeded:
            q[i].exponential_(generator=rows[i].generator)
        # exponential_ may return exactly 0; 0/0 would be NaN, which argmax treats as the max.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)

    # ---- results --------------------------------------------------------------------------
    @staticmethod
    def _collect(raw_logprobs: torch.Tensor, tokens: torch.Tensor,
                 num_logprobs: list[int | None],
                 accepted: torch.Tensor | None = None) -> SamplerOutput:
        """Pack tokens, logprobs, ranks and top-k (num_logprobs[i] for row i; None: no
        logprobs) into one fp32 tensor: one transfer.

        Token ids and ranks are exact in fp32 for vocabularies below 2**24.
        """
        chosen = raw_logprobs.gather(1, tokens[:, None])
        parts = [tokens[:, None].float(), chosen]
        want = [n is not None for n in num_logprobs]
        k = min(max(n or 0 for n in num_logprobs), raw_logprobs.shape[1])
        if any(want):
            parts.append(((raw_logprobs > chosen).sum(-1, keepdim=True) + 1).float())
            if k > 0:
                top = raw_logprobs.topk(k, dim=-1)
                # rank = 1 + tokens strictly higher; those all lie inside the top-k
                top_rank = (top.values[:, None, :] > top.values[:, :, None]).sum(-1) + 1
                parts += [top.values, top.indices.float(), top_rank.float()]
        if accepted is not None:  # the last column
            parts.append(accepted[:, None].float())
        packed = torch.cat(parts, dim=1).tolist()

        token_ids = [int(p[0]) for p in packed]
        token_logprobs = [p[1] for p in packed]
        logprobs: list[dict[int, Logprob] | None] = [None] * len(num_logprobs)
        for i, n in enumerate(num_logprobs):
            if n is None:
                continue
            p = packed[i]
            entry = {token_ids[i]: Logprob(p[1], int(p[2]))}
            vals, ids, ranks = p[3:3 + k], p[3 + k:3 + 2 * k], p[3 + 2 * k:3 + 3 * k]
            for j in range(min(n, k)):
                entry.setdefault(int(ids[j]), Logprob(vals[j], int(ranks[j])))
            logprobs[i] = entry
        return SamplerOutput(token_ids, token_logprobs, logprobs,
                             [p[-1] == 1.0 for p in packed] if accepted is not None else [])

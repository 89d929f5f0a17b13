"""Speculative decoding's engine side: which sequences get drafts, how many, and the
counters of how many were accepted (vLLM's spec_decode metrics and log line).

Drafts come from the ngram proposer (engine/ngram_proposer.py), a draft model
(engine/draft_model.py) or an EAGLE head (engine/eagle.py), the latter two batched over
the sequences; the scheduler reserves their KV
slots (engine/scheduler.py: Scheduler._draft), the model runner verifies them
in the step's forward, the sampler accepts or replaces them (layers/sampler.py,
layers/rejection_sampler.py) and LLMEngine emits the accepted run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex.config import SpeculativeConfig
from loraplex.engine.ngram_proposer import NgramProposer
from loraplex.engine.sequence import Sequence

if TYPE_CHECKING:
    from loraplex.engine.draft_model import DraftModel
    from loraplex.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


def can_speculate(seq: Sequence) -> bool:
    """Whether a sequence's sampling can verify several positions in one step exactly.
    Structured outputs cannot: their mask at a draft position depends on the grammar
    state after the drafts before it, which the matcher would have to advance and roll
    back. Everything else the sampler does depends only on the tokens before a position
    (penalties, bad words and min_tokens count them per position), so it is exact."""
    return seq.grammar is None and seq.params.structured_outputs is None


class Drafter:
    """Per decoding sequence, the drafts to verify in the next step: at most
    num_speculative_tokens, and never so many that accepting all of them plus the bonus
    token would pass max_tokens or max_model_len. From the ngram proposer, or with a
    draft model or EAGLE head (a DraftModel) from it, for all the step's sequences at
    once."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int,
                 draft: DraftModel | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.draft = draft
        self.proposer = (NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
                         if draft is None else None)

    def room(self, seq: Sequence) -> int:
        """How many drafts the sequence may verify now (0: none)."""
        if not can_speculate(seq):
            return 0
        room = min(self.config.num_speculative_tokens,
                   self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(room, 0)

    def propose(self, seq: Sequence) -> list[int]:
        """The ngram proposer's drafts for one sequence."""
        room = self.room(seq)
        return self.proposer.propose(seq.token_ids, room) if room > 0 else []

    def propose_all(self, seqs: list[Sequence]
                    ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per sequence its drafts and, for a draft model's sampled request, the draft's
        distribution at each ([n, vocab]; else None: the draft is deterministic)."""
        if self.draft is None:
            return [(self.propose(seq), None) for seq in seqs]
        return self.draft.propose(seqs, [self.room(seq) for seq in seqs])


@dataclass
class SpecDecodeStats:
    """Cumulative counters, as vLLM's: verification rows with drafts, draft tokens,
    accepted ones, and accepted ones by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position += [0] * (num_draft_tokens
                                                 - len(self.accepted_per_position))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens,
                               self.num_accepted_tokens, list(self.accepted_per_position))


class SpecDecodeLogger:
    """vLLM's periodic "SpecDecoding metrics" line, over the drafts since the last one."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = SpecDecodeStats()
        self._last_time = time.monotonic()

    def maybe_log(self, stats: SpecDecodeStats, force: bool = False) -> str | None:
        now = time.monotonic()
        if not force and now - self._last_time < self.interval_s:
            return None
        drafts = stats.num_drafts - self._last.num_drafts
        if not drafts:
            return None
        drafted = stats.num_draft_tokens - self._last.num_draft_tokens
        accepted = stats.num_accepted_tokens - self._last.num_accepted_tokens
        last = self._last.accepted_per_position
        per_pos = [(n - (last[i] if i < len(last) else 0)) / drafts
                   for i, n in enumerate(stats.accepted_per_position)]
        line = (f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, "
                f"Accepted: {accepted} tokens, Drafted: {drafted} tokens, "
                f"Per-position acceptance rate: {', '.join(f'{r:.3f}' for r in per_pos)}, "
                f"Avg Draft acceptance rate: {100 * accepted / max(drafted, 1):.1f}%")
        logger.info("%s", line)
        self._last, self._last_time = stats.copy(), now
        return line


def draft_probs(seq_drafts: list[tuple[Sequence, list[int]]], batch: ScheduledBatch,
                logits: torch.Tensor) -> torch.Tensor | None:
    """[rows, logits' width] the draft model's distribution behind each sampled row's
    draft (zeros elsewhere: greedy and draftless rows ignore it), in the sampler's row
    order; None when no draft came with one (ngram, or only greedy requests)."""
    probs = dict(zip(batch.spec, batch.spec_probs))
    if all(q is None for q in probs.values()):
        return None
    out = logits.new_zeros(sum(len(d) + 1 for _, d in seq_drafts), logits.shape[1],
                           dtype=torch.float32)
    row = 0
    for seq, d in seq_drafts:
        q = probs.get(seq) if d else None
        if q is not None:
            width = min(q.shape[1], out.shape[1])
            out[row:row + len(d), :width] = q[:, :width]
        row += len(d) + 1
    return out

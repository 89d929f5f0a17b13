"""EAGLE speculative decoding's proposer: an EAGLE-1 or EAGLE-3 head (models/eagle.py)
drafts each decoding sequence's next tokens from the target's features, batched over the
sequences (vLLM's EagleProposer, chain drafting: no tree).

The target's features of every position it computes (prompt chunks, verified drafts,
decodes) come from its ModelRunner (`observe`, its feature_sink) and wait per sequence
until the head has read them. The head's row of position p reads token p + 1 and the
target's feature at p, so after the target computed a sequence of n tokens up to its
last one, the head can compute positions up to n - 2; the last of them proposes token n.
A proposal first catches the head's cache up over those positions (prefill chunks within
max_num_batched_tokens), then drafts autoregressively: each further forward reads the
draft before it and the head's own output feature of the row before. The drafts'
positions were computed from the head's features, not the target's: they are never kept
(the next catch-up recomputes them with the target's, as vLLM does).

The head's state per sequence is draft_model.py's (its own block table from the head's
block pool, its computed length), in a frame that starts at `offset`: the first target
position whose feature it got. That is 0 unless the target skipped a cached prefix
(prefix caching), whose features it never computed: then the head's context starts
where the target's computation did, positions shifted (rotary attention depends only on
their differences), and its drafts are those of a head that saw the text from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from loraplex.config import CacheConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from loraplex.engine.draft_model import DraftModel, DraftState
from loraplex.engine.sequence import Sequence
from loraplex.engine.spec_decode import can_speculate
from loraplex.models.eagle import (
    EagleHead,
    build_head,
    read_head_config,
    read_head_weights,
)
from loraplex.models.loader import resolve_model_path
from loraplex.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EagleState(DraftState):
    """One sequence in the head's frame: frame position q is the sequence's position
    offset + q, its token the sequence's token offset + q + 1; `features` holds the
    target's features of frame positions num_computed_tokens on, not yet read."""

    def __init__(self, seq: Sequence, offset: int) -> None:
        super().__init__(seq)
        self.offset = offset
        self.features: torch.Tensor | None = None

    @property
    def num_features(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    def add(self, start: int, rows: torch.Tensor) -> bool:
        """The target's features of its positions start.. (a later computation of a
        position replaces an earlier one: a rejected draft's). False when they do not
        follow what the state has (a gap): the caller starts the state over."""
        q = start - self.offset
        c = self.num_computed_tokens
        if q > c + self.num_features:
            return False
        if q < c:  # positions the head has read already (not expected: kept as they are)
            rows, q = rows[c - q:], c
        if rows.shape[0]:
            kept = self.features[:q - c] if self.features is not None else rows[:0]
            self.features = torch.cat([kept, rows])  # a copy: graph outputs get reused
        return True


class EagleProposer(DraftModel):
    """The head, its runner and KV blocks (draft_model.py's), an EagleState per
    sequence, and the target's features waiting in them."""

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        super().__init__(runner, max_num_batched_tokens)
        self.head: EagleHead = runner.model
        self.states: dict[int, EagleState] = {}  # type: ignore[assignment]

    def observe(self, computed: list[tuple[Sequence, int, torch.Tensor]]) -> None:
        """The target's features of a step (ModelRunner.feature_sink): per sequence its
        first position computed and its rows. Sequences that never get drafts
        (structured outputs) keep none."""
        for seq, start, rows in computed:
            if not can_speculate(seq):
                continue
            state = self.states.get(seq.seq_id)
            if state is None or not state.add(start, rows):
                self.release(seq)  # a gap (a cached prefix): the head starts from here
                state = self.states[seq.seq_id] = EagleState(seq, start)
                state.add(start, rows)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], rooms: list[int]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per sequence up to rooms[i] draft tokens, and for a sampled request the head's
        distribution at each ([n, vocab]; None for greedy ones)."""
        out: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(seqs)
        active: list[tuple[int, Sequence, EagleState, int]] = []
        for i, (seq, room) in enumerate(zip(seqs, rooms)):
            room = min(room, self.max_model_len - seq.num_tokens + 1)
            state = self.states.get(seq.seq_id)
            if room <= 0 or state is None:
                continue
            length = seq.num_tokens - 1 - state.offset  # frame positions to compute
            if not state.num_computed_tokens < length <= (state.num_computed_tokens
                                                          + state.num_features):
                continue  # nothing new to read, or features missing: no drafts now
            state.token_ids = list(seq.token_ids[state.offset + 1:])
            # positions written: the catch-up's, then the drafts' but the last
            if self._grow(state, length + room - 1):
                active.append((i, seq, state, room))
        if not active:
            return out
        logits, feature = self._catch_up([state for _, _, state, _ in active])
        drafts: dict[int, list[int]] = {i: [] for i, *_ in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, *_ in active}
        rooms_of = {i: room for i, _, _, room in active}
        live = [(i, seq, state) for i, seq, state, _ in active]
        step = 0
        while True:
            tokens, dists = self._choose(logits[:, :self.vocab_size], [s for _, s, _ in live])
            for (i, _, _), token, dist in zip(live, tokens, dists):
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
            step += 1
            keep = [j for j, (i, *_) in enumerate(live) if rooms_of[i] > step]
            if not keep:
                break
            live = [live[j] for j in keep]
            for i, _, state in live:  # the next row: the draft, at the next position
                state.token_ids.append(drafts[i][-1])
            self.head.features = feature[keep]
            logits = self.runner.run([s for _, _, s in live], [],
                                     prefill_lens=[1] * len(live)).logits
            feature = self.head.prenorm
            self.num_forwards += 1
            for _, _, state in live:
                state.num_computed_tokens += 1
        for i, seq, state, _ in active:  # the drafts' positions are recomputed next time
            state.num_computed_tokens = seq.num_tokens - 1 - state.offset
            out[i] = (drafts[i], torch.stack(probs[i]) if probs[i] else None)
        return out

    def _catch_up(self, states: list[EagleState]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every frame position with the target's feature into the head's cache, in
        prefill chunks within max_num_batched_tokens; the logits and output features of
        each state's last row ([len(states), ...], in order)."""
        todo = {id(s): s.features[:s.num_tokens - s.num_computed_tokens] for s in states}
        logits: dict[int, torch.Tensor] = {}
        feature: dict[int, torch.Tensor] = {}
        read = dict.fromkeys(todo, 0)
        while len(logits) < len(states):
            budget = self.max_num_batched_tokens
            batch, lens = [], []
            for state in states:
                n = state.num_uncomputed_tokens
                if n == 0 or budget == 0:
                    continue
                batch.append(state)
                lens.append(min(n, budget))
                budget -= lens[-1]
            self.head.features = self.head.combine(torch.cat(
                [todo[id(s)][read[id(s)]:read[id(s)] + n] for s, n in zip(batch, lens)]))
            step = self.runner.run(batch, [], prefill_lens=lens)
            self.num_forwards += 1
            self.num_catch_up_tokens += sum(lens)
            j = 0
            for state, n, end in zip(batch, lens, _segment_ends(lens)):
                read[id(state)] += n
                state.num_computed_tokens += n
                if state.num_uncomputed_tokens == 0:  # its chunk reached the last position
                    logits[id(state)] = step.logits[j]
                    feature[id(state)] = self.head.prenorm[end]
                    j += 1
        for state in states:
            state.features = None  # read (what lay past them was a rejected draft's)
        return (torch.stack([logits[id(s)] for s in states]),
                torch.stack([feature[id(s)] for s in states]))


def _segment_ends(lens: list[int]) -> list[int]:
    """The last row of each segment laid out back to back."""
    ends, total = [], 0
    for n in lens:
        total += n
        ends.append(total - 1)
    return ends


def load_eagle_head(spec: SpeculativeConfig, target_config: Any, target: Any,
                    mc: ModelConfig, build: Callable[[Callable[[], Any]], Any]) -> EagleHead:
    """The head checkpoint read, checked against the target (hidden size, vocabulary,
    EAGLE-3's layers) and built; the target set to keep EAGLE-3's layer inputs."""
    try:
        path = resolve_model_path(spec.model, spec.revision)
    except ValueError as e:
        raise ValueError(f"speculative_config: EAGLE head {e}") from None
    cfg = read_head_config(path, spec.method, min(spec.max_model_len or mc.max_model_len,
                                                  mc.max_model_len))
    hidden, layers = target_config.hidden_size, target.args.num_layers
    a = cfg.args
    if cfg.target_hidden_size != hidden or (spec.method == "eagle" and a.hidden_size != hidden):
        raise ValueError(f"speculative_config: the EAGLE head {spec.model!r} reads features "
                         f"of width {cfg.target_hidden_size}; the target's hidden_size is "
                         f"{hidden}")
    if a.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config: the EAGLE head's vocab_size ({a.vocab_size}) "
                         f"is not the target's ({target_config.vocab_size})")
    if spec.method == "eagle3":
        ids = cfg.aux_layer_ids or (2, layers // 2, layers - 3)  # vLLM's default
        if len(set(ids)) != 3 or len(ids) != 3 or not all(0 <= i < layers for i in ids):
            raise ValueError(f"speculative_config: EAGLE-3 reads the inputs of three "
                             f"distinct layers of the target's {layers}; layer ids "
                             f"{list(ids)} are not (the head config's "
                             "eagle_aux_hidden_state_layer_ids, else 2, L // 2, L - 3)")
        target.model.aux_layers = tuple(ids)
    head = build(lambda: build_head(cfg, read_head_weights(path), target, path))
    return head


def make_eagle(head: EagleHead, mc: ModelConfig, cache: CacheConfig, sched: SchedulerConfig,
               spec: SpeculativeConfig, num_blocks: int) -> EagleProposer:
    """The head's runner over a KV cache of `num_blocks` blocks (the target's count),
    eager (its features are an input no decode graph holds)."""
    head_mc = replace(mc, max_model_len=min(spec.max_model_len or mc.max_model_len,
                                            mc.max_model_len),
                      runner="generate", pooler_config=None, pooling_task=None,
                      enforce_eager=True)
    head_cache = replace(cache, num_blocks_override=num_blocks, enable_prefix_caching=False)
    runner = ModelRunner(head, head_mc, head_cache, sched)
    logger.info("%s head %s: %d KV blocks of its own", "EAGLE-3" if spec.method == "eagle3"
                else "EAGLE", spec.model, runner.num_blocks)
    return EagleProposer(runner, sched.max_num_batched_tokens)

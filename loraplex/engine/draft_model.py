"""Draft-model speculative decoding's proposer: a small LLM of the target's vocabulary
proposes each decoding sequence's next tokens, batched over the sequences.

The draft has its own paged KV cache (its own ModelRunner and block pool, with as many
blocks as the target's) and, per sequence, a DraftState: its own block table and how
many of the sequence's tokens its cache holds. A proposal first catches the draft's
cache up with the tokens the target emitted since (prefill chunks within
max_num_batched_tokens), then runs k decode forwards of the batch, one token each: the
first over each sequence's last token, the others over the draft tokens before. Of the
draft tokens it forwarded, those the target then accepted are kept in its cache (their
K/V were computed from the same tokens); everything after them is overwritten.

Greedy requests get the draft's argmax; sampled ones a token drawn from the draft's
softmax at the request's temperature, with that distribution (q) for the rejection
sampler (layers/rejection_sampler.py). The draft runs without adapters (vLLM's rule) and
without prefix caching. A sequence whose draft blocks do not fit gets no drafts in that
step; preempted or finished sequences give their draft blocks back (`release`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from loraplex.config import CacheConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from loraplex.engine.sequence import Sequence
from loraplex.layers.quantization.config import quant_config_from_hf
from loraplex.models.loader import load_weights, resolve_model_path
from loraplex.models.registry import architecture, build_model
from loraplex.models.text_only import text_only_config
from loraplex.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class DraftState:
    """One sequence as the draft's ModelRunner sees it (the Sequence fields it reads):
    the tokens to compute, how many are in the draft's cache, its draft block table."""

    images = None  # the draft reads token ids only
    pooling = None
    lora_int_id = 0  # the draft runs without adapters

    def __init__(self, seq: Sequence) -> None:
        self.seq_id = seq.seq_id
        self.num_prompt_tokens = seq.num_prompt_tokens
        self.token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # the last proposal: the sequence's length then, and the drafts forwarded then
        self.base = 0
        self.forwarded: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def sync(self, seq: Sequence, vocab_size: int) -> None:
        """The sequence's tokens now (a token an adapter added, past the draft's
        vocabulary, read as its last token: the draft has no row for it); the cache is
        trusted up to the last proposal's length plus the forwarded drafts the sequence
        went on with (and never past its last token, whose logits the first forward
        needs)."""
        self.token_ids = list(seq.token_ids)
        if self.token_ids and max(self.token_ids) >= vocab_size:
            self.token_ids = [min(t, vocab_size - 1) for t in self.token_ids]
        kept = 0
        for draft, token in zip(self.forwarded, seq.token_ids[self.base:]):
            if draft != token:
                break
            kept += 1
        self.num_computed_tokens = min(self.num_computed_tokens, self.base + kept,
                                       self.num_tokens - 1)


class DraftModel:
    """The draft LLM, its runner and KV blocks, and a DraftState per sequence."""

    def __init__(self, runner: ModelRunner, max_num_batched_tokens: int) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.vocab_size = runner.model.args.vocab_size
        self.free_blocks = list(range(runner.num_blocks - 1, -1, -1))
        self.states: dict[int, DraftState] = {}
        self.num_forwards = 0  # draft forwards run (catch-up chunks and decode steps)
        self.num_catch_up_tokens = 0  # tokens its catch-up prefills computed

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def release(self, seq: Sequence) -> None:
        """The sequence left the running set (finished, aborted, preempted): its draft
        cache goes; after a preemption it is computed again from the start."""
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self.free_blocks += reversed(state.block_table)

    def _grow(self, state: DraftState, positions: int) -> bool:
        """Blocks for `positions` tokens, from free ones only; False when they do not fit
        (the state keeps what it had)."""
        need = -(-positions // self.block_size) - len(state.block_table)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            state.block_table.append(self.free_blocks.pop())
        return True

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], rooms: list[int]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per sequence up to rooms[i] draft tokens, and for a sampled request the
        draft's distribution at each ([n, vocab]; None for greedy ones)."""
        out: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(seqs)
        active: list[tuple[int, Sequence, DraftState, int]] = []
        for i, (seq, room) in enumerate(zip(seqs, rooms)):
            room = min(room, self.max_model_len - seq.num_tokens + 1)
            if room <= 0:
                continue
            state = self.states.get(seq.seq_id)
            if state is None:
                state = self.states[seq.seq_id] = DraftState(seq)
            state.sync(seq, self.vocab_size)
            # positions written: the sequence's tokens, then the drafts but the last
            if self._grow(state, seq.num_tokens + room - 1):
                active.append((i, seq, state, room))
        if not active:
            return out
        self.runner.decode_mirror.reset()  # the states' lengths went back: no mirror follows
        self._catch_up([state for _, _, state, _ in active])
        drafts: dict[int, list[int]] = {i: [] for i, *_ in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, *_ in active}
        for step in range(max(room for *_, room in active)):
            live = [(i, seq, state) for i, seq, state, room in active if room > step]
            logits = self.runner.run([], [state for _, _, state in live]).logits
            self.num_forwards += 1
            tokens, dists = self._choose(logits[:, :self.vocab_size], [s for _, s, _ in live])
            for (i, _, state), token, dist in zip(live, tokens, dists):
                state.num_computed_tokens += 1
                state.token_ids.append(token)
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
        for i, seq, state, room in active:  # its cache now holds the room - 1 drafts too
            state.base, state.forwarded = seq.num_tokens, drafts[i][:room - 1]
            out[i] = (drafts[i], torch.stack(probs[i]) if probs[i] else None)
        return out

    def _catch_up(self, states: list[DraftState]) -> None:
        """Every token but the last of each state into the draft's cache, in prefill
        chunks within max_num_batched_tokens (no logits: the decode steps take them)."""
        while True:
            todo = [(s, s.num_uncomputed_tokens - 1) for s in states
                    if s.num_uncomputed_tokens > 1]
            if not todo:
                return
            budget = self.max_num_batched_tokens
            batch, lens = [], []
            for state, n in todo:
                if budget == 0:
                    break
                batch.append(state)
                lens.append(min(n, budget))
                budget -= lens[-1]
            self.runner.run(batch, [], prefill_lens=lens)
            self.num_forwards += 1
            for state, n in zip(batch, lens):
                state.num_computed_tokens += n
            self.num_catch_up_tokens += sum(lens)

    @staticmethod
    def _choose(logits: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each row's draft token: the argmax for a greedy request; else drawn from
        softmax(logits / temperature) (a seeded request's from its own generator), that
        distribution returned with it."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in sampled],
                                 device=logits.device)
            p = torch.softmax(logits.index_select(0, idx) / temps[:, None], dim=-1)
            race = torch.empty_like(p)
            for j, i in enumerate(sampled):
                race[j].exponential_(generator=seqs[i].generator)
            picks = (p / race.clamp_min_(torch.finfo(p.dtype).tiny)).argmax(dim=-1)
            tokens = tokens.index_copy(0, idx, picks)
            for j, i in enumerate(sampled):
                dists[i] = p[j]
        return tokens.tolist(), dists


def load_draft_model(spec: SpeculativeConfig, target_config: Any, target_tokenizer: Any,
                     mc: ModelConfig, build: Callable[[Callable[[], Any]], Any]) -> Any:
    """The draft checkpoint built with loraplex's model code and loaded, after checking
    it shares the target's vocabulary (vocab_size, and its tokenizer's vocabulary when it
    has one). `build`: makes a module in the target's dtype, on its device."""
    try:
        path = resolve_model_path(spec.model, spec.revision)
    except ValueError as e:
        raise ValueError(f"speculative_config: draft {e}") from None
    hf_config = AutoConfig.from_pretrained(path)
    hf_config, text_only = text_only_config(hf_config, path)
    try:
        architecture(hf_config)
    except ValueError as e:
        raise ValueError(f"speculative_config: draft model {spec.model!r}: {e}") from None
    if hf_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config: the draft model's vocab_size "
                         f"({hf_config.vocab_size}) is not the target's "
                         f"({target_config.vocab_size}): a draft must share the target's "
                         "vocabulary")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # no (usable) tokenizer files: the vocab size is all to check
    if tokenizer is not None and tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(f"speculative_config: the draft model's tokenizer ({spec.model}) "
                         "does not have the target's vocabulary (token -> id)")
    quant = quant_config_from_hf(hf_config, spec.quantization)
    model = build(lambda: build_model(hf_config, quant, (), text_only,
                                      spec.max_model_len or mc.max_model_len))
    load_weights(model, path)
    return model.eval()


def make_draft(model: Any, mc: ModelConfig, cache: CacheConfig, sched: SchedulerConfig,
               spec: SpeculativeConfig, num_blocks: int) -> DraftModel:
    """The draft's runner over a KV cache of `num_blocks` blocks (the target's count:
    the memory budget was split between the two caches per block)."""
    draft_mc = replace(mc, max_model_len=min(spec.max_model_len or mc.max_model_len,
                                             mc.max_model_len),
                       runner="generate", pooler_config=None, pooling_task=None)
    draft_cache = replace(cache, num_blocks_override=num_blocks, enable_prefix_caching=False)
    runner = ModelRunner(model, draft_mc, draft_cache, sched)
    logger.info("draft model %s: %d layers, %d KV blocks of its own", spec.model,
                model.args.num_layers, runner.num_blocks)
    return DraftModel(runner, sched.max_num_batched_tokens)

"""Structured outputs: requests whose output must follow a JSON schema, a regex, a list of
choices or a grammar, with xgrammar (vLLM's default backend).

A request's spec is compiled once against the tokenizer (an LRU of compiled grammars,
so a thousand requests with one schema compile it once); each of its sequences gets a
matcher that tracks where in the grammar its output is. Before each sampling step the
matchers of the batch's constrained rows fill one bitmask of the tokens allowed next,
which the sampler applies after penalties and logit_bias (logprobs stay the raw model's,
as everywhere); each sampled token then advances its matcher. A sequence whose grammar
is complete stops there.

A reasoning model (--reasoning-parser) thinks first: its matchers are wrapped in
`AfterReasoning`, which lets the reasoning through unconstrained and starts the grammar
after the end tag (vLLM's behaviour).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.sampling_params import StructuredOutputsParams


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # a dependency; only an odd install lacks it
        raise ValueError("structured outputs need xgrammar: pip install xgrammar") from e
    return xgrammar


def _choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings (JSON string literals are valid EBNF ones)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


@dataclass
class TokenMask:
    """The tokens allowed next for some rows of a batch: xgrammar's packed bitmask, a row
    for each of `rows`."""

    bitmask: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32
    rows: list[int]  # the batch rows it constrains
    vocab_size: int  # the grammar's vocabulary: columns past it are never allowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on every disallowed token, in place (logits: fp32, [len(rows), V], the
        constrained rows only). Columns past the grammar's vocabulary (tokens an adapter
        adds, which the grammar does not know) are disallowed."""
        _xgrammar().apply_token_bitmask_inplace(
            logits, self.bitmask.to(logits.device, non_blocking=True))
        logits[:, self.vocab_size:] = float("-inf")
        return logits


class AfterReasoning:
    """A sequence's matcher that waits for its reasoning to end (reasoning.py): no
    constraint until the end tag, then the grammar from the next token. "undecided"
    (qwen3, whose replies think only when they open with the start tag): the first token
    is the start tag or one the grammar allows."""

    def __init__(self, matcher: Any, start_id: int, end_id: int, state: str) -> None:
        self.matcher, self.start_id, self.end_id = matcher, start_id, end_id
        self.state = state  # "reasoning" | "undecided" | "constrained"

    def constrains(self) -> bool:
        return self.state != "reasoning" and not self.matcher.is_terminated()

    def is_terminated(self) -> bool:
        return self.state == "constrained" and self.matcher.is_terminated()

    def accept_token(self, token: int) -> bool:
        if self.state == "constrained":
            return self.matcher.accept_token(token)
        if self.state == "undecided" and token != self.start_id:
            self.state = "constrained"
            return self.matcher.accept_token(token)
        if token == self.end_id:
            self.state = "constrained"
        elif self.state == "undecided":
            self.state = "reasoning"  # it opened with the start tag
        return True

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.state == "undecided":  # the start tag is allowed as well
            word, bit = divmod(self.start_id, 32)
            bitmask[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)


class StructuredOutputs:
    """Compiles specs (cached) and builds the batch's token mask from its matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_cached: int = 256) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._compiler: Any = None
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()  # the server tokenizes (and compiles) off the loop

    def _compile(self, params: StructuredOutputsParams, kind: str) -> Any:
        xgr = _xgrammar()
        if self._compiler is None:
            own = getattr(self.tokenizer, "xgrammar_info", None)  # Mistral's tokenizer
            info = own(xgr, self.vocab_size) if own is not None else \
                xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        try:
            if kind in ("json", "json_object"):  # json_object: any JSON object, as vLLM
                schema = ('{"type": "object"}' if kind == "json_object" else params.json
                          if isinstance(params.json, str) else json.dumps(params.json))
                return self._compiler.compile_json_schema(
                    schema, any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return self._compiler.compile_regex(params.regex)
            if kind == "choice":
                return self._compiler.compile_grammar(_choice_grammar(params.choice))
            return self._compiler.compile_grammar(params.grammar)
        except Exception as e:  # xgrammar raises RuntimeError / its own types
            raise ValueError(f"invalid structured output {kind}: {e}") from e

    def compiled(self, params: StructuredOutputsParams) -> Any:
        """The spec compiled, or taken from the cache. Raises ValueError for a spec that
        does not compile."""
        key = params.key()
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = self._compile(params, key[0])
                self._compiled[key] = compiled
                while len(self._compiled) > self._max_cached:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(key)
        return compiled

    def matchers(self, params: StructuredOutputsParams, n: int,
                 reasoning: tuple[int, int, str] | None = None) -> list[Any]:
        """A fresh matcher for each of a request's n sequences. `reasoning`: (start tag
        id, end tag id, AfterReasoning's first state) for a model that thinks first."""
        compiled = self.compiled(params)
        matchers = [_xgrammar().GrammarMatcher(compiled) for _ in range(n)]
        if reasoning is None or reasoning[2] == "constrained":
            return matchers
        return [AfterReasoning(m, *reasoning) for m in matchers]

    def token_mask(self, matchers: list[Any | None]) -> TokenMask | None:
        """The allowed next tokens of every row whose matcher constrains it now (None: no
        such row)."""
        rows = [i for i, m in enumerate(matchers) if m is not None and (
            m.constrains() if isinstance(m, AfterReasoning) else not m.is_terminated())]
        if not rows:
            return None
        bitmask = _xgrammar().allocate_token_bitmask(len(rows), self.vocab_size)
        for j, i in enumerate(rows):
            matchers[i].fill_next_token_bitmask(bitmask, j)
        return TokenMask(bitmask, rows, self.vocab_size)

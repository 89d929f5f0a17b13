"""SamplingParams: how to pick tokens and when to stop (vLLM's names and defaults)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

MAX_LOGPROBS = 20  # vLLM's default max_logprobs (EngineArgs): top-k lists cost a transfer per step
_GREEDY_EPS = 1e-5


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


P = TypeVar("P")  # a prompt's ids (a list), or its embeddings' rows (a tensor)


def truncated_prompt(ids: P, k: int | None, max_model_len: int) -> P:
    """A prompt's last `k` ids (truncate_prompt_tokens; -1: max_model_len - 1, the most
    that leaves room for one new token); all of them when k is None."""
    if k is None:
        return ids
    return ids[-(max_model_len - 1 if k == -1 else k):]


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's StructuredOutputsParams; exactly one field):
    a JSON schema (dict or JSON text), any JSON object, a regex, one of a list of
    strings, or an EBNF grammar (xgrammar's dialect, GBNF-like)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON: only the whitespace a compact dump has, not any amount between tokens
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, "
                             f"grammar or json_object, got {given or 'none'}")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple))
                                        or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")
        if self.choice is not None:
            self.choice = list(self.choice)

    def key(self) -> tuple[str, str]:
        """(kind, spec): what a compiled grammar is cached by."""
        import json

        compact = "compact:" if self.disable_any_whitespace else ""
        if self.json is not None:
            spec = self.json if isinstance(self.json, str) else json.dumps(self.json,
                                                                           sort_keys=True)
            return "json", compact + spec
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        return "json_object", compact


GuidedDecodingParams = StructuredOutputsParams  # vLLM's older name


@dataclass
class SamplingParams:
    """Per-request sampling settings; validated on construction so bad requests fail early.

    `stop` and `stop_token_ids` are normalized to lists. top_k 0 or -1 means no top-k.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = field(default=None)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words never generated (their last token banned)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: as
    # many as max_model_len leaves room for)
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text (no stop strings then)
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name for it
    # vLLM's: arguments for custom logits processors and other extensions (over HTTP:
    # the request's vllm_xargs); loraplex itself reads none of them
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding, not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise self._bad("structured_outputs", "a StructuredOutputsParams")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self._validate()

    def _bad(self, name: str, rule: str) -> ValueError:
        return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def _check_range(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise self._bad(name, rule)

    def _validate(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise self._bad("n", "an int >= 1")
        pres, freq = self.presence_penalty, self.frequency_penalty
        self._check_range("presence_penalty", _is_number(pres) and -2 <= pres <= 2, "in [-2, 2]")
        self._check_range("frequency_penalty", _is_number(freq) and -2 <= freq <= 2,
                          "in [-2, 2]")
        rep = self.repetition_penalty
        self._check_range("repetition_penalty", _is_number(rep) and rep > 0, "> 0")
        temp = self.temperature
        self._check_range("temperature", _is_number(temp) and temp >= 0, ">= 0")
        top_p = self.top_p
        self._check_range("top_p", _is_number(top_p) and 0 < top_p <= 1, "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise self._bad("top_k", "-1 or 0 (disabled) or an int >= 1")
        min_p = self.min_p
        self._check_range("min_p", _is_number(min_p) and 0 <= min_p <= 1, "in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise self._bad("seed", "an int or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise self._bad("max_tokens", "an int >= 1 or None")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise self._bad("min_tokens", "an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens}")
        # their upper bound is the engine's max_logprobs (LLMEngine.add_request checks it)
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise self._bad("logprobs", "an int >= 0 or None")
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise self._bad("prompt_logprobs", "an int >= 0 or None")
        bias = self.logit_bias
        if bias is not None and (not isinstance(bias, dict) or any(
                not _is_int(t) or t < 0 or not _is_number(b) or not -100 <= b <= 100
                for t, b in bias.items())):
            raise self._bad("logit_bias", "a dict of token id (int >= 0) -> bias in [-100, 100]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise self._bad("stop", "a non-empty string or a list of non-empty strings")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise self._bad("stop_token_ids", "a list of ints >= 0")
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, list | tuple) or not allowed
                                    or any(not _is_int(t) or t < 0 for t in allowed)):
            raise self._bad("allowed_token_ids", "a non-empty list of token ids (ints >= 0)")
        if self.bad_words is not None and (not isinstance(self.bad_words, list | tuple) or any(
                not isinstance(w, str) or not w.strip() for w in self.bad_words)):
            raise self._bad("bad_words", "a list of non-empty strings")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise self._bad("extra_args", "a dict or None")
        trunc = self.truncate_prompt_tokens
        if trunc is not None and (not _is_int(trunc) or not (trunc >= 1 or trunc == -1)):
            raise self._bad("truncate_prompt_tokens", "-1 or an int >= 1")

    @property
    def greedy(self) -> bool:
        """Temperature ~0 means argmax: no randomness, so the seed is irrelevant."""
        return self.temperature < _GREEDY_EPS

    def truncate_prompt(self, ids: P, max_model_len: int) -> P:
        """The prompt's last truncate_prompt_tokens ids (or rows of its embeddings)."""
        return truncated_prompt(ids, self.truncate_prompt_tokens, max_model_len)

    def clone(self) -> SamplingParams:
        """A deep copy, so per-request edits (e.g. max_tokens) do not leak to shared params."""
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters (LLM.beam_search, loraplex/beam_search.py)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # accepted, as vLLM's (no stop strings here)

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

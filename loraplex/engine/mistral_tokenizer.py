"""tokenizer_mode="mistral": Mistral's own tokenizer (mistral_common: tekken.json or a
tokenizer.model.v* sentencepiece file) behind the HF-like surface the engine and the
server use (encode, decode, ids <-> tokens, the vocabulary, special ids).

Chat is encoded by mistral_common's request encoding (`encode_chat`: the OpenAI messages
as its ChatCompletionRequest), never by a Jinja template: `chat_template` is None, and a
request's chat_template / chat_template_kwargs are refused (vLLM's rule). As in
mistral_common, text never encodes to a control token: "[INST]" in a prompt is text.
"""

from __future__ import annotations

import logging
import os
import re
from functools import cached_property
from typing import Any

from loraplex.models.mistral_format import has_consolidated

logger = logging.getLogger(__name__)

MODES = ("auto", "hf", "slow", "mistral")
_SPM_FILE = re.compile(r"tokenizer\.model\.v\d+(m\d+)?")
INSTALL_HINT = ("tokenizer_mode='mistral' needs mistral_common (and sentencepiece for "
                "tokenizer.model.v* files): pip install 'loraplex[mistral]'")


def mistral_tokenizer_file(path: str) -> str | None:
    """The directory's Mistral tokenizer file: tekken.json first, else the newest
    tokenizer.model.v* (mistral_common's own choice)."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "tekken.json")):
        return os.path.join(path, "tekken.json")
    spm = sorted(f for f in os.listdir(path) if _SPM_FILE.fullmatch(f))
    return os.path.join(path, spm[-1]) if spm else None


def _has_mistral_common() -> bool:
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_tokenizer_mode(mode: str, path: str) -> str:
    """"hf" or "mistral". vLLM's "auto": Mistral's tokenizer for a checkpoint in
    Mistral's format (consolidated*.safetensors) that ships one (tekken.json,
    tokenizer.model.v*); without mistral_common installed, auto stays with HF's."""
    if mode not in MODES:
        raise ValueError(f"tokenizer_mode={mode!r}: use one of " + ", ".join(MODES))
    if mode in ("hf", "slow"):
        return "hf"
    if mode == "mistral":
        if mistral_tokenizer_file(path) is None:
            raise ValueError(f"tokenizer_mode='mistral': {path} has no tekken.json or "
                             "tokenizer.model.v* (Mistral's tokenizer files)")
        return "mistral"
    if has_consolidated(path) and mistral_tokenizer_file(path) is not None:
        if _has_mistral_common():
            return "mistral"
        logger.warning("%s ships Mistral's tokenizer, but mistral_common is not installed: "
                       "using the HF tokenizer (pip install 'loraplex[mistral]')", path)
    return "hf"


class MistralTokenizer:
    """mistral_common's tokenizer with the methods of an HF tokenizer loraplex calls."""

    chat_template = None  # chat goes through encode_chat
    is_mistral = True

    def __init__(self, file: str) -> None:
        try:
            from mistral_common.protocol.instruct.validator import ValidationMode
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _Mistral
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        self.file = file
        try:
            self.mistral = _Mistral.from_file(file, mode=ValidationMode.test)
        except ImportError as e:  # sentencepiece, for tokenizer.model.v* files
            raise ImportError(f"{INSTALL_HINT} ({e})") from e
        self.raw = self.mistral.instruct_tokenizer.tokenizer  # Tekkenizer or sentencepiece

    @classmethod
    def from_pretrained(cls, path: str) -> MistralTokenizer:
        file = mistral_tokenizer_file(path)
        if file is None:
            raise ValueError(f"{path} has no tekken.json or tokenizer.model.v* file")
        return cls(file)

    def __deepcopy__(self, memo: dict) -> MistralTokenizer:
        return MistralTokenizer(self.file)  # a copy of its own for the server's threads

    def __len__(self) -> int:
        return self.raw.n_words

    @property
    def vocab_size(self) -> int:
        return self.raw.n_words

    @property
    def bos_token_id(self) -> int:
        return self.raw.bos_id

    @property
    def eos_token_id(self) -> int:
        return self.raw.eos_id

    @property
    def pad_token_id(self) -> int:
        return self.raw.pad_id

    @property
    def unk_token_id(self) -> int:
        return self.raw.unk_id

    @cached_property
    def all_special_ids(self) -> list[int]:
        return [i for i in range(self.raw.n_words) if self.raw.is_special(i)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.raw.encode(text, bos=add_special_tokens, eos=False)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> Any:
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": self.encode(text, add_special_tokens)})

    def decode(self, ids: list[int] | int, skip_special_tokens: bool = False, **_: Any) -> str:
        """(HF's spaces_between_special_tokens / clean_up_tokenization_spaces: no
        meaning here, ignored.)"""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self.raw.decode([ids] if isinstance(ids, int) else list(ids),
                               special_token_policy=policy)

    def convert_ids_to_tokens(self, ids: list[int] | int, skip_special_tokens: bool = False
                              ) -> list[str] | str:
        if isinstance(ids, int):
            return self.raw.id_to_piece(ids)
        return [self.raw.id_to_piece(i) for i in ids
                if not (skip_special_tokens and self.raw.is_special(i))]

    @cached_property
    def _vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = {}
        for i in reversed(range(self.raw.n_words)):  # the lowest id wins a shared piece
            vocab[self.raw.id_to_piece(i)] = i
        return dict(sorted(vocab.items(), key=lambda kv: kv[1]))

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def convert_tokens_to_ids(self, tokens: list[str] | str) -> list[int] | int:
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.raw.unk_id)
        return [self._vocab.get(t, self.raw.unk_id) for t in tokens]

    def apply_chat_template(self, conversation: list[dict[str, Any]],
                            tools: list[dict] | None = None, tokenize: bool = True,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            chat_template: str | None = None, **kwargs: Any
                            ) -> list[int] | str:
        """HF's call, for users of LLM.get_tokenizer(): encode_chat's ids (or their text);
        add_generation_prompt means nothing here (mistral_common ends a user turn with
        [/INST]); a template, or another template variable, is refused."""
        effort = kwargs.pop("reasoning_effort", None)
        if chat_template is not None or kwargs:
            raise ValueError("chat_template and template variables are not supported for "
                             "Mistral tokenizers (tokenizer_mode 'mistral')")
        ids = self.encode_chat(conversation, tools, continue_final_message, effort)
        return ids if tokenize else self.decode(ids)

    def xgrammar_info(self, xgr: Any, vocab_size: int) -> Any:
        """xgrammar's TokenizerInfo (its from_huggingface reads HF tokenizers only):
        tekken's raw bytes, or sentencepiece's pieces (byte fallback); control tokens are
        empty, so no grammar writes them as text."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        special = set(self.all_special_ids)
        if isinstance(self.raw, Tekkenizer):
            vocab: list[Any] = [b"" if i in special else
                                self.raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)
                                for i in range(self.raw.n_words)]
            kind = xgr.VocabType.RAW
        else:
            vocab = ["" if i in special else self.raw.id_to_piece(i)
                     for i in range(self.raw.n_words)]
            kind = xgr.VocabType.BYTE_FALLBACK
        return xgr.TokenizerInfo(vocab, kind, vocab_size=vocab_size,
                                 stop_token_ids=[self.eos_token_id])

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                    continue_final_message: bool = False,
                    reasoning_effort: str | None = None) -> list[int]:
        """mistral_common's encoding of an OpenAI chat (its own validation, in test mode:
        the conversation must end with a user or tool message, or with an assistant one
        to continue). ValueError for a conversation it refuses."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kw = {"reasoning_effort": reasoning_effort} if reasoning_effort is not None else {}
        try:
            request = ChatCompletionRequest.from_openai(
                _short_call_ids(messages), tools=tools or None,
                continue_final_message=continue_final_message, **kw)
            return list(self.mistral.encode_chat_completion(request).tokens)
        except (AssertionError, MistralCommonException, ValueError, TypeError) as e:
            raise ValueError(f"mistral_common cannot encode these messages: {e}") from e


def _short_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistral's tool call ids are 9 characters: longer ones (another client's) keep
    their last 9, as vLLM truncates them."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": c["id"][-9:]} if isinstance(c.get("id"), str)
                               else c for c in m["tool_calls"]]
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = m["tool_call_id"][-9:]
        out.append(m)
    return out

"""Text a processor inserts into a tokenized prompt, tokenized as HF's processor tokenizes
it: HF's processors insert their text into the prompt's text and tokenize the whole, so a
piece of text merges with the prompt's text beside it (" Frame" is one token after
"USER:", "Frame" alone another). Only special and added tokens split the text there, so
each run of text between two of them that holds inserted text is decoded and tokenized
again with it; runs without inserted text keep their ids (Gemma 3's pan-and-scan text,
models/gemma3_vision.py; InternVL's video frames' "Frame{i}: ", engine/internvl_videos.py).
"""

from __future__ import annotations

from typing import Any


class TextSplice:
    """A tokenizer's way to merge inserted text with the token ids around it."""

    def __init__(self, tokenizer: Any, special: set[int]) -> None:
        """`special`: the model's own marker tokens, split on beside the tokenizer's
        special and added tokens."""
        self.encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False)
        self.special = {*special, *getattr(tokenizer, "all_special_ids", ()),
                        *getattr(tokenizer, "added_tokens_decoder", {})}

    def __call__(self, pieces: list[int | str]) -> list[int]:
        """Token ids (int) and inserted text (str) in order -> the ids tokenizing the
        whole text gives, up to the nearest special tokens."""
        out: list[int] = []
        run: list[int | str] = []
        for p in [*pieces, None]:
            if p is not None and (isinstance(p, str) or p not in self.special):
                run.append(p)
                continue
            out += self._text_run(run)
            run = []
            if p is not None:
                out.append(p)
        return out

    def _text_run(self, run: list[int | str]) -> list[int]:
        """A run of text between special tokens: as it is, or with inserted text in it,
        its text tokenized again."""
        if not any(isinstance(p, str) for p in run):
            return list(run)  # type: ignore[arg-type]
        text, ids = "", []
        for p in run:
            if isinstance(p, str):
                text, ids = text + self.decode(ids) + p, []
            else:
                ids.append(p)
        return self.encode(text + self.decode(ids))

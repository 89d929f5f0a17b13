"""vLLM's online conversion of a causal LM into a sequence classifier: rerankers trained
as LMs that answer "yes" or "no" (Qwen3-Reranker, mxbai-rerank-v2, bge-reranker-v2-gemma),
served with `hf_overrides` naming a `*ForSequenceClassification` architecture and
`classifier_from_token`.

The score head is made of lm_head rows, so no converted checkpoint is needed:
  from_2_way_softmax (tokens [false, true]): one label, the row of true minus the row of
    false. sigmoid(h.(W_true - W_false)) = softmax over the two tokens' logits, taken at
    the true token: the LM's own probability of "yes" against "no".
  no_post_processing (N tokens): N labels, those tokens' rows as they are.
`is_original_qwen3_reranker: true` means from_2_way_softmax (vLLM's
Qwen3ForSequenceClassificationConfig). Such a reranker's pair is one text, the two
concatenated (`use_pad_token` defaults to false, vLLM's "LLM as reranker"), and it scores
the prompt's last token, as the LM would predict the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraplex.layers.classifier import ClassifierHead

METHODS = ("from_2_way_softmax", "no_post_processing")


@dataclass(frozen=True)
class LMHeadClassifier:
    """How the head is made: the method and the tokens whose lm_head rows it takes."""

    method: str
    tokens: tuple[str, ...]

    @classmethod
    def from_config(cls, hf_config: Any) -> LMHeadClassifier | None:
        """The conversion the (overridden) config asks for, None for none; as vLLM's
        SequenceClassificationConfig, it sets num_labels and defaults use_pad_token to
        false on `hf_config`."""
        tokens = getattr(hf_config, "classifier_from_token", None)
        method = getattr(hf_config, "method", None)
        if getattr(hf_config, "is_original_qwen3_reranker", False):
            if not isinstance(tokens, list | tuple) or len(tokens) != 2:
                raise ValueError("is_original_qwen3_reranker needs classifier_from_token: "
                                 'the false and the true token, e.g. ["no", "yes"]')
            method = "from_2_way_softmax"
        if tokens is None and method is None:
            return None
        if method is None:
            raise ValueError("classifier_from_token needs a method (hf_overrides' "
                             f"\"method\"): one of {', '.join(METHODS)}")
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; use one of "
                             + ", ".join(METHODS))
        if (not isinstance(tokens, list | tuple) or not tokens
                or not all(isinstance(t, str) for t in tokens)):
            raise ValueError(f"classifier_from_token must be a list of tokens, got {tokens!r}")
        if method == "from_2_way_softmax" and len(tokens) != 2:
            raise ValueError("from_2_way_softmax needs two classifier_from_token: the false "
                             f"and the true token, got {list(tokens)}")
        hf_config.num_labels = 1 if method == "from_2_way_softmax" else len(tokens)
        hf_config.use_pad_token = getattr(hf_config, "use_pad_token", False)
        return cls(method, tuple(tokens))

    def head(self, lm_head: torch.Tensor, vocab: dict[str, int]) -> ClassifierHead:
        """The head from the lm_head weight [vocab, hidden] and the tokenizer's vocabulary
        (token -> id); a token the vocabulary lacks is an error, not the unknown token's
        row."""
        missing = [t for t in self.tokens if t not in vocab]
        if missing:
            raise ValueError(f"classifier_from_token: {missing} not in the tokenizer's "
                             "vocabulary")
        ids = [vocab[t] for t in self.tokens]
        if max(ids) >= lm_head.shape[0]:
            raise ValueError(f"classifier_from_token: token id {max(ids)} is past the "
                             f"lm_head's {lm_head.shape[0]} rows")
        rows = lm_head.detach()[ids].float().cpu()
        if self.method == "from_2_way_softmax":
            return ClassifierHead(rows[1:2] - rows[0:1])
        return ClassifierHead(rows.clone())

"""Adapters that add tokens to the vocabulary: finding and assembling the new rows.

A PEFT adapter trained after `tokenizer.add_tokens(...)` and
`model.resize_token_embeddings(len(tokenizer))` saves embed_tokens and lm_head whole,
V + n rows each (PEFT's `save_embedding_layers`, on by default after a resize). Their
first V rows must still be the base's; rows V.. are the n added tokens. On top of them:

- `trainable_token_indices` (PEFT's TrainableTokens): the trained rows of the listed
  ids, saved apart (`token_adapter.trainable_tokens_delta`: the rows themselves, not a
  difference); only ids >= V are served (new tokens; a base token's own row cannot
  differ per adapter);
- a LoRA on embed_tokens / lm_head of the resized layer: its columns / rows past V act
  on the added tokens alone, so they are folded into those rows;
- vLLM's own format, `new_embeddings.safetensors` with `input_embeddings` and
  `output_embeddings` [n, hidden].

With tied embeddings lm_head is the embedding, so an added token's output row is its
input row. The result is one AddedTokens per adapter (lora/extra_vocab.py serves it).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from loraplex.lora.errors import LoRAError

if TYPE_CHECKING:
    from loraplex.lora.adapter import TargetShapes

_NEW_EMBEDDINGS = ("new_embeddings.safetensors", "new_embeddings.bin")
# embed_tokens / lm_head whole: beside their LoRA (`X.base_layer.weight`), beside
# trainable tokens (`X.token_adapter.base_layer.weight`) or alone (`X.weight`; a
# modules_to_save copy saved with save_embedding_layers also as `X.modules_to_save.weight`)
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.token_adapter)?"
                            r"\.base_layer\.weight$")
_VOCAB_WEIGHT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>(?:.+\.)?"
                               r"(?:embed_tokens|lm_head))(?:\.modules_to_save)?\.weight$")
# the untrained original PEFT keeps beside a modules_to_save copy (save_embedding_layers)
_ORIGINAL_KEY = re.compile(r"^(?:base_model\.model\.)?(?:.+\.)?(?:embed_tokens|lm_head)"
                           r"\.original_module\.weight$")
_TOKEN_DELTA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\."
                              r"trainable_tokens_delta(?:\.[^.]+)?$")
_LORA_EMBEDDING_A = re.compile(r"(?:^|\.)embed_tokens\.lora_embedding_A(?:\.[^.]+)?$")
_LORA_HEAD_B = re.compile(r"(?:^|\.)lm_head\.lora_B(?:\.[^.]+)?\.weight$")


def vocab_copy_module(key: str) -> str | None:
    """The module a saved whole weight belongs to (a `base_layer` copy of any module, or
    embed_tokens / lm_head saved alone); None for any other key."""
    m = _BASE_COPY_KEY.match(key) or _VOCAB_WEIGHT_KEY.match(key)
    return m.group("module") if m else None


def is_original_copy(key: str) -> bool:
    """An embed_tokens / lm_head as it was before training, saved beside its trained copy
    (modules_to_save): the trained one is what serves."""
    return _ORIGINAL_KEY.match(key) is not None


def token_delta_module(key: str) -> str | None:
    """The module of a TrainableTokens row block, else None."""
    m = _TOKEN_DELTA_KEY.match(key)
    return m.group("module") if m else None


@dataclass
class AddedTokens:
    """The rows of the n tokens an adapter adds past the base's vocabulary V: token V + i
    is `input_embeddings[i]` in the embedding and `output_embeddings[i]` in lm_head."""

    input_embeddings: torch.Tensor  # [n, hidden]
    output_embeddings: torch.Tensor  # [n, hidden]

    @property
    def num_tokens(self) -> int:
        return self.input_embeddings.shape[0]


def _leaf_module(names: dict[str, torch.Tensor], leaf: str) -> str | None:
    return next((n for n in names if n.rsplit(".", 1)[-1] == leaf), None)


def _token_indices(cfg: dict, embed: str | None) -> dict[str, list[int]]:
    """trainable_token_indices by module leaf: a list means the embedding (PEFT's rule)."""
    raw = cfg.get("trainable_token_indices") or {}
    if isinstance(raw, list):
        return {(embed or "embed_tokens").rsplit(".", 1)[-1]: [int(i) for i in raw]}
    return {str(k).rsplit(".", 1)[-1]: [int(i) for i in v] for k, v in raw.items()}


def _header_shapes(path: str) -> dict[str, list[int]]:
    """Every saved tensor's shape, without reading the weights (a .bin is memory-mapped);
    vLLM's new_embeddings tensors under "new_embeddings.<key>"."""
    weights = ("adapter_model.safetensors" if os.path.isfile(
        os.path.join(path, "adapter_model.safetensors")) else "adapter_model.bin")
    out: dict[str, list[int]] = {}
    for fname in (weights, *_NEW_EMBEDDINGS):
        file = os.path.join(path, fname)
        if not os.path.isfile(file):
            continue
        try:
            if fname.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(file, framework="pt") as f:
                    names = f.keys()
                    shapes = {k: list(f.get_slice(k).get_shape()) for k in names}
            else:
                saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                shapes = {k: list(t.shape) for k, t in saved.items()}
        except Exception:  # a corrupt file: the load (off the step loop) reports it
            continue
        prefix = "new_embeddings." if fname in _NEW_EMBEDDINGS else ""
        out.update({prefix + k: v for k, v in shapes.items()})
    return out


def read_new_embeddings(name: str, path: str) -> dict[str, torch.Tensor] | None:
    """vLLM's new_embeddings file, if the adapter has one."""
    for fname in _NEW_EMBEDDINGS:
        file = os.path.join(path, fname)
        if os.path.isfile(file):
            try:
                if fname.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(file)
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise LoRAError(f"LoRA adapter {name!r}: cannot read {file}: {e}") from e
    return None


def count_added_tokens(name: str, path: str, cfg: dict, targets: TargetShapes) -> int:
    """How many tokens the adapter adds past the base's vocabulary, from file headers and
    its config alone (registration: no weights read). Raises when it adds more than
    `targets.extra_vocab_size`, or when its tokenizer adds ids its weights have no rows
    for."""
    vocab = targets.vocab_size
    if vocab is None:
        return 0
    shapes = _header_shapes(path)
    counts = [0]
    for key, shape in shapes.items():
        if key.startswith("new_embeddings."):
            counts.append(shape[0])
        elif (vocab_copy_module(key) or "").rsplit(".", 1)[-1] in ("embed_tokens", "lm_head") \
                and len(shape) == 2:
            counts.append(shape[0] - vocab)
        elif _LORA_EMBEDDING_A.search(key) and len(shape) == 2:
            counts.append(shape[1] - vocab)
        elif _LORA_HEAD_B.search(key) and len(shape) == 2:
            counts.append(shape[0] - vocab)
    indices = [i for ids in _token_indices(cfg, None).values() for i in ids]
    counts += [max(indices) + 1 - vocab] if indices else []
    n = max(counts)
    if n and targets.lm_head_bias:
        raise LoRAError(f"LoRA adapter {name!r} adds {n} tokens past the base vocabulary "
                        f"of {vocab}: not supported on a model whose lm_head has a bias "
                        "(Phi), which the added tokens' rows would be served without")
    if n > targets.extra_vocab_size:
        raise LoRAError(f"LoRA adapter {name!r} has {n} extra embeddings (tokens added past "
                        f"the base vocabulary of {vocab}), but lora_extra_vocab_size="
                        f"{targets.extra_vocab_size}; restart with --lora-extra-vocab-size "
                        f"{n}")
    added = os.path.join(path, "added_tokens.json")
    if n == 0 and os.path.isfile(added):
        extra = sorted(i for i in _added_token_ids(name, added) if i >= vocab)
        if extra:
            raise LoRAError(f"LoRA adapter {name!r}: its tokenizer adds {len(extra)} token(s) "
                            f"past the base vocabulary of {vocab} (added_tokens.json, ids "
                            f"{extra[0]}..{extra[-1]}) but its weights have no rows for them "
                            "(save it with save_embedding_layers=True)")
    return n


def _added_token_ids(name: str, path: str) -> list[int]:
    try:
        with open(path) as f:
            added = json.load(f)
    except (OSError, ValueError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: added_tokens.json is not valid JSON: {e}"
                        ) from e
    if not isinstance(added, dict):
        raise LoRAError(f"LoRA adapter {name!r}: added_tokens.json is not a JSON object")
    return [i for i in added.values() if isinstance(i, int)]


def load_adapter_tokenizer(name: str, path: str, vocab_size: int, num_added: int) -> Any:
    """The adapter's own tokenizer (saved beside it after `add_tokens`): it encodes the
    added tokens as ids vocab_size.. and decodes them back."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise LoRAError(f"LoRA adapter {name!r} adds {num_added} tokens to the vocabulary but "
                        f"{path} has no usable tokenizer for them; save the tokenizer with "
                        "the adapter") from e
    if len(tok) > vocab_size + num_added:
        raise LoRAError(f"LoRA adapter {name!r}: its tokenizer has {len(tok)} tokens, but the "
                        f"base vocabulary ({vocab_size}) and the {num_added} rows it adds "
                        f"cover only {vocab_size + num_added}")
    return tok


@dataclass
class VocabParts:
    """What an adapter's files hold for embed_tokens / lm_head beside plain LoRA, gathered
    while its tensors are read, then assembled by `added_tokens`."""

    name: str
    targets: TargetShapes
    copies: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)  # module -> (key, W)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # module leaf -> rows
    folds: dict[str, torch.Tensor] = field(default_factory=dict)  # module leaf -> [n, hidden]
    # fully trained tables (modules_to_save): module leaf -> rows of the base vocabulary
    full: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_copy(self, key: str, module: str, weight: torch.Tensor) -> None:
        if module not in self.targets.base_weights:
            raise LoRAError(f"LoRA adapter {self.name!r}: unexpected tensor {key!r} (a full "
                            f"copy of {module}, which the base model has no LoRA layer for)")
        self.copies[module] = (key, weight)

    def add_delta(self, module: str, rows: torch.Tensor) -> None:
        self.deltas[module.rsplit(".", 1)[-1]] = rows

    def split_lora(self, module: str, a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA of a resized embed_tokens / lm_head (B scaled): the part that acts on the
        added tokens is folded into their rows, the rest returned for the slots."""
        vocab, leaf = self.targets.vocab_size, module.rsplit(".", 1)[-1]
        if leaf == "embed_tokens" and a.dim() == 2 and a.shape[1] > vocab:
            # x[V+i] += B A[:, V+i]
            self.folds[leaf] = (b.float() @ a[:, vocab:].float()).T
            return a[:, :vocab], b
        if leaf == "lm_head" and b.dim() == 2 and b.shape[0] > vocab:
            # z[V+i] += (B[V+i] A) . h
            self.folds[leaf] = b[vocab:].float() @ a.float()
            return a, b[:vocab]
        return a, b

    def _added_rows(self, module: str, trained: set[str]) -> torch.Tensor | None:
        """Rows V.. of a saved embed_tokens / lm_head. Its rows below V must be the base's,
        unless the module is in `trained` (modules_to_save, served): they go to `full`."""
        if module not in self.copies:
            return None
        key, saved = self.copies[module]
        base, name = self.targets.base_weights[module], self.name
        if saved.dim() != 2 or saved.shape[1] != base.shape[1] or \
                saved.shape[0] < base.shape[0]:
            raise LoRAError(f"LoRA adapter {name!r} ships {module} with shape "
                            f"{tuple(saved.shape)} where the base has {tuple(base.shape)}: it "
                            "was trained for another model (or a vocabulary resized smaller)")
        vocab = base.shape[0]
        known = saved[:vocab]
        leaf = module.rsplit(".", 1)[-1]
        if leaf in trained:
            self.full[leaf] = known
            return saved[vocab:].float()
        rows = max(1, 2**26 // max(1, base[0].numel() * base.element_size()))  # 64 MiB pieces
        if not all(torch.equal(known[i:i + rows].to(base.device, base.dtype), base[i:i + rows])
                   for i in range(0, vocab, rows)):
            raise LoRAError(f"LoRA adapter {name!r} ships a {module} ({key}) whose rows for "
                            "the base vocabulary differ from the base model's, and its "
                            "modules_to_save does not name it: if it was trained, list it "
                            "there (and start with --enable-lora-modules-to-save); if not, "
                            "save the adapter with save_embedding_layers=False")
        return saved[vocab:].float()

    def added_tokens(self, cfg: dict, new_embeddings: dict[str, torch.Tensor] | None
                     ) -> AddedTokens | None:
        name, t = self.name, self.targets
        embed = _leaf_module(t.base_weights, "embed_tokens")
        head = _leaf_module(t.base_weights, "lm_head")
        if new_embeddings is not None:  # vLLM's format
            inputs = new_embeddings.get("input_embeddings")
            outputs = new_embeddings.get("output_embeddings", inputs if t.tied_embeddings
                                         else None)
            if inputs is None or outputs is None:
                raise LoRAError(f"LoRA adapter {name!r}: new_embeddings needs "
                                "input_embeddings and output_embeddings tensors")
            inputs, outputs = inputs.float(), outputs.float()
        else:
            trained = {m.rsplit(".", 1)[-1] for m in cfg.get("modules_to_save") or []} \
                if t.full_vocab else set()
            inputs = self._added_rows(embed, trained) if embed else None
            outputs = self._added_rows(head, trained) if head else None
            if missing := sorted(trained & {"embed_tokens", "lm_head"} - set(self.full)):
                raise LoRAError(f"LoRA adapter {name!r}: modules_to_save names "
                                f"{', '.join(missing)} but its weights have no such table")
        for leaf, ids in _token_indices(cfg, embed).items():
            rows = self.deltas.get(leaf)
            inside = [i for i in ids if i < t.vocab_size]
            if inside:
                raise LoRAError(f"LoRA adapter {name!r} trains the embeddings of {len(inside)} "
                                f"token(s) of the base vocabulary (trainable_token_indices, "
                                f"e.g. {inside[0]}): only tokens it adds (ids >= "
                                f"{t.vocab_size}) can differ per adapter")
            target = inputs if leaf == "embed_tokens" else outputs
            if rows is None or target is None or max(ids) - t.vocab_size >= target.shape[0]:
                raise LoRAError(f"LoRA adapter {name!r}: trainable_token_indices of {leaf} "
                                "without their saved rows and the resized layer (save it "
                                "with save_embedding_layers=True)")
            target[torch.tensor(ids) - t.vocab_size] = rows.float()
        if t.tied_embeddings:
            outputs = inputs  # lm_head is the embedding: its added rows too
        n_in, n_out = (0 if x is None else x.shape[0] for x in (inputs, outputs))
        if n_in == n_out == 0:
            if self.folds:
                raise LoRAError(f"LoRA adapter {name!r}: its LoRA covers added tokens, but "
                                "it ships no rows for them (save it with "
                                "save_embedding_layers=True)")
            return None
        if n_in != n_out:
            raise LoRAError(f"LoRA adapter {name!r}: the tokens it adds need rows in both "
                            f"embed_tokens and lm_head; it has {n_in} and {n_out}")
        n = n_in
        if n > t.extra_vocab_size:
            raise LoRAError(f"LoRA adapter {name!r} has {n} extra embeddings, but "
                            f"lora_extra_vocab_size={t.extra_vocab_size}; restart with "
                            f"--lora-extra-vocab-size {n}")
        inputs = inputs + self.folds.get("embed_tokens", 0)
        outputs = outputs + self.folds.get("lm_head", 0)
        return AddedTokens(inputs, outputs)

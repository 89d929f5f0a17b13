"""Read a PEFT LoRA directory, validate it against the base model, fold in the scaling.

    W' x = W x + s * B (A x),   s = lora_alpha / r   (or lora_alpha / sqrt(r) with rsLoRA)

`s` is computed here, per module (rank_pattern / alpha_pattern), and multiplied into B,
so the serving path never sees it. Everything that can be wrong with an adapter is
caught here, at load time, with a message that names the adapter and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from loraplex.lora.errors import LoRAError, LoRANotFoundError
from loraplex.lora.request import LoRARequest

# modules whose full weight PEFT saves beside their LoRA (save_embedding_layers)
_VOCAB_MODULES = ("embed_tokens", "lm_head")


@dataclass
class LoRAModuleWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], scaling folded in


@dataclass
class LoRAModel:
    """One adapter as read and validated, PEFT's way: keys are HF module names
    (`...q_proj`), scaling folded into B. LoRAManager.pack lays it out for the slots."""

    lora_int_id: int
    name: str
    path: str
    rank: int
    modules: dict[str, LoRAModuleWeights]


@dataclass
class PackedLoRA:
    """An adapter as the host tier keeps it: for each LoRA layer it touches, its weights
    in the layout of one slot of that layer (LinearWithLoRA.pack): A [r, n, in] and
    B [sum(out_k), r]. Copying it into a slot is then two copies per layer."""

    lora_int_id: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TargetShapes:
    """What the base model offers: HF module name -> (in_features, out_features)."""

    shapes: dict[str, tuple[int, int]]
    suffixes: tuple[str, ...]  # the supported target leaf names (q_proj, ...)
    vocab_size: int | None = None  # the base's embedding rows; None = unknown
    # HF name -> the base's weight, for embed_tokens / lm_head: an adapter that saved a
    # copy of them (PEFT's save_embedding_layers) must have saved them unchanged
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict, compare=False,
                                                  repr=False)


def local_adapter_dir(req: LoRARequest) -> str | None:
    """The adapter's local directory; None for a hub id (fetched when loaded)."""
    path = os.path.expanduser(req.lora_path)
    if os.path.isdir(path):
        return path
    if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise LoRANotFoundError(f"LoRA adapter {req.lora_name!r}: path {req.lora_path!r} "
                                "does not exist (give a PEFT directory or a hub id 'org/name')")
    return None


def resolve_adapter_path(req: LoRARequest) -> str:
    path = local_adapter_dir(req)
    if path is not None:
        return path
    path = os.path.expanduser(req.lora_path)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as e:  # offline, unknown repo, auth: all mean "cannot get it"
        raise LoRANotFoundError(f"LoRA adapter {req.lora_name!r}: {req.lora_path!r} is not a "
                                f"local directory and could not be fetched from the hub: {e}"
                                ) from e


def _read_config(name: str, path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise LoRANotFoundError(f"LoRA adapter {name!r}: no adapter_config.json in {path}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json is not valid JSON: {e}"
                        ) from e
    if not isinstance(cfg, dict):
        raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json is not a JSON object")
    return cfg


def _check_config(name: str, cfg: dict, max_rank: int, targets: TargetShapes) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type {peft_type!r} is not LoRA")
    if cfg.get("use_dora"):
        raise LoRAError(f"LoRA adapter {name!r} uses DoRA (use_dora=true), which is not "
                        "supported yet; merge it into the base or retrain as plain LoRA")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"LoRA adapter {name!r} has modules_to_save={cfg['modules_to_save']}: "
                        "fully trained extra modules are not supported yet")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {max(ranks)} > max_lora_rank="
                        f"{max_rank}; restart with --max-lora-rank {max(ranks)}")
    target = cfg.get("target_modules")
    if isinstance(target, list):
        leaves = {m.rsplit(".", 1)[-1] for m in targets.shapes}
        for t in target:
            if t.rsplit(".", 1)[-1] not in leaves:
                raise LoRAError(f"LoRA adapter {name!r}: target module {t!r} not found in the "
                                "model (supported: " + ", ".join(targets.suffixes) + "); the "
                                "adapter was trained for a different architecture")


_EXTRA_VOCAB = ("adapters that add tokens are not supported yet (--lora-extra-vocab-size is "
                "accepted but has no effect); use an adapter trained on the base vocabulary")


def _new_embeddings_rows(path: str) -> int | None:
    """Extra tokens in vLLM's new_embeddings.safetensors (its first tensor's rows)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            return f.get_slice(keys[0]).get_shape()[0] if keys else None
    except Exception:  # unreadable: the refusal does not need the count
        return None


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


def _check_not_supported_yet(name: str, path: str, cfg: dict, vocab_size: int | None) -> None:
    """Long-context LoRA and extra vocabulary: refused by name, never silently ignored.

    Extra vocabulary shows as vLLM's new_embeddings file, PEFT's trainable tokens, or an
    added_tokens.json with ids past the base's vocabulary. (transformers writes every id
    past the tokenizer's base vocab there, e.g. Llama 3's in-vocabulary special tokens,
    so that file alone means nothing: it is checked only when ``vocab_size`` is known.)
    """
    if cfg.get("context_length") or cfg.get("rope_scaling"):
        what = (f"context_length={cfg['context_length']}" if cfg.get("context_length")
                else f"rope_scaling={cfg['rope_scaling']}")
        raise LoRAError(f"LoRA adapter {name!r} is a long-context LoRA ({what}): long-context "
                        "LoRA is not supported yet (--long-lora-scaling-factors is accepted "
                        "but has no effect)")
    for fname in ("new_embeddings.safetensors", "new_embeddings.bin"):
        if os.path.isfile(os.path.join(path, fname)):
            rows = _new_embeddings_rows(os.path.join(path, fname))
            count = f"{rows} new token embeddings" if rows else "new token embeddings"
            raise LoRAError(f"LoRA adapter {name!r} ships {count} ({fname}): " + _EXTRA_VOCAB)
    if cfg.get("trainable_token_indices"):
        raise LoRAError(f"LoRA adapter {name!r} trains token embeddings "
                        "(trainable_token_indices): " + _EXTRA_VOCAB)
    added = os.path.join(path, "added_tokens.json")
    if vocab_size is not None and os.path.isfile(added):
        extra = sorted(i for i in _added_token_ids(name, added) if i >= vocab_size)
        if extra:
            raise LoRAError(f"LoRA adapter {name!r} adds {len(extra)} token(s) past the base "
                            f"vocabulary of {vocab_size} (added_tokens.json, ids {extra[0]}.."
                            f"{extra[-1]}): " + _EXTRA_VOCAB)


def check_adapter_config(req: LoRARequest, targets: TargetShapes, max_rank: int) -> None:
    """The cheap part of validation (no weights read): what registration checks, so that
    thousands of adapters can be registered and loaded only when a request needs them.
    A hub id is checked when it is fetched."""
    path = local_adapter_dir(req)
    if path is not None:
        cfg = _read_config(req.lora_name, path)
        _check_config(req.lora_name, cfg, max_rank, targets)
        _check_not_supported_yet(req.lora_name, path, cfg, targets.vocab_size)


def _read_tensors(name: str, path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.exists(st):
            from safetensors.torch import load

            # read, not mmap: adapters are small, and any readable source works (a pipe,
            # a network filesystem) without holding the file open afterwards
            with open(st, "rb") as f:
                return load(f.read())
        if os.path.isfile(bin_path):
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise assorted types for a corrupt file
        raise LoRAError(f"LoRA adapter {name!r}: cannot read weights in {path}: {e}") from e
    raise LoRANotFoundError(f"LoRA adapter {name!r}: no adapter_model.safetensors or "
                            f"adapter_model.bin in {path}")


def _pattern_value(module: str, patterns: dict, default: float) -> float:
    """PEFT's rule: a pattern key matches a module whose name ends with it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_[AB])"
                  r"(?:\.[^.]+)?\.weight$")
# PEFT's embedding LoRA: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r], saved
# without ".weight" (they are parameters, not modules)
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_"
                            r"(?P<ab>[AB])(?:\.[^.]+)?$")
_BASE_COPY_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")


def _module_name(name: str, key: str) -> tuple[str, str]:
    """(HF module name, "lora_A" | "lora_B") of a LoRA weight's key."""
    if "lora_magnitude_vector" in key:
        raise LoRAError(f"LoRA adapter {name!r} has {key!r}: DoRA is not supported yet")
    m = _KEY.match(key)
    if m is not None:
        return m.group("module"), m.group("kind")
    m = _EMBEDDING_KEY.match(key)
    if m is not None:
        return m.group("module"), "lora_" + m.group("ab")
    if any(f"{u}.weight" in key for u in _VOCAB_MODULES):
        raise LoRAError(f"LoRA adapter {name!r} ships full {key!r} weights (a resized "
                        "vocabulary or a saved embedding/lm_head): " + _EXTRA_VOCAB)
    raise LoRAError(f"LoRA adapter {name!r}: unexpected tensor {key!r} (not a LoRA A/B "
                    "weight); extra vocabulary or saved modules are not supported yet")


def _check_base_copy(name: str, key: str, module: str, saved: torch.Tensor,
                     targets: TargetShapes) -> None:
    """PEFT saves embed_tokens / lm_head whole beside their LoRA (save_embedding_layers,
    on by default when they are targeted). An unchanged copy is harmless and skipped; a
    different one (a resized vocabulary, trained embeddings) cannot be served as LoRA."""
    base = targets.base_weights.get(module)
    if base is None:
        raise LoRAError(f"LoRA adapter {name!r}: unexpected tensor {key!r} (a full copy of "
                        f"{module}, which the base model has no LoRA layer for)")
    if saved.shape != base.shape:
        raise LoRAError(f"LoRA adapter {name!r} ships {module} with shape "
                        f"{tuple(saved.shape)} where the base has {tuple(base.shape)} (a "
                        "resized vocabulary): " + _EXTRA_VOCAB)
    rows = max(1, 2**26 // max(1, base[0].numel() * base.element_size()))  # 64 MiB pieces
    if not all(torch.equal(saved[i:i + rows].to(base.device, base.dtype), base[i:i + rows])
               for i in range(0, base.shape[0], rows)):
        raise LoRAError(f"LoRA adapter {name!r} ships a {module} ({key}) that differs from "
                        "the base model's: fully trained embeddings or lm_head are not "
                        "supported (LoRA on them is); if they were not trained, save the "
                        "adapter with save_embedding_layers=False")


def load_adapter(req: LoRARequest, targets: TargetShapes, max_rank: int,
                 dtype: torch.dtype) -> LoRAModel:
    """Read, validate and scale one adapter (host memory). Thread-safe: touches no state."""
    name = req.lora_name
    path = resolve_adapter_path(req)
    cfg = _read_config(name, path)
    _check_config(name, cfg, max_rank, targets)
    _check_not_supported_yet(name, path, cfg, targets.vocab_size)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(name, path).items():
        copy = _BASE_COPY_KEY.match(key)
        if copy is not None:
            _check_base_copy(name, key, copy.group("module"), tensor, targets)
            continue
        module, kind = _module_name(name, key)
        pairs.setdefault(module, {})[kind] = tensor
    if not pairs:
        raise LoRAError(f"LoRA adapter {name!r}: no LoRA weights in {path}")
    default_r, default_alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    modules: dict[str, LoRAModuleWeights] = {}
    for module, ab in pairs.items():
        if module not in targets.shapes:
            raise LoRAError(f"LoRA adapter {name!r}: target module {module!r} not found in the "
                            "model (supported: " + ", ".join(targets.suffixes) + ")")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"LoRA adapter {name!r}: module {module!r} lacks its "
                            f"{'lora_B' if 'lora_A' in ab else 'lora_A'} weight")
        a, b = ab["lora_A"], ab["lora_B"]
        in_f, out_f = targets.shapes[module]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, rank):
            raise LoRAError(f"LoRA adapter {name!r}: {module} has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}, which do not fit the base layer (in={in_f}, "
                            f"out={out_f}); the adapter was trained for another base model")
        if rank > max_rank:
            raise LoRAError(f"LoRA adapter {name!r} has rank {rank} > max_lora_rank={max_rank};"
                            f" restart with --max-lora-rank {rank}")
        r = _pattern_value(module, cfg.get("rank_pattern") or {}, default_r)
        alpha = _pattern_value(module, cfg.get("alpha_pattern") or {}, default_alpha)
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = LoRAModuleWeights(
            lora_a=a.to(dtype).contiguous(),
            lora_b=(b.float() * scaling).to(dtype).contiguous())
    return LoRAModel(lora_int_id=req.lora_int_id, name=name, path=path,
                     rank=max(w.lora_a.shape[0] for w in modules.values()), modules=modules)

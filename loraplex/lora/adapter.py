"""Read a PEFT LoRA directory, validate it against the base model, fold in the scaling.

    W' x = W x + s * B (A x),   s = lora_alpha / r   (or lora_alpha / sqrt(r) with rsLoRA)

`s` is computed here, per module (rank_pattern / alpha_pattern), and multiplied into B,
so the serving path never sees it. A DoRA adapter (use_dora) also brings each module's
magnitude vector m (lora/dora.py); one with lora_bias, lora_B's bias b (W' x + s * b,
scaled here too). Everything that can be wrong with an adapter is
caught here, at load time, with a message that names the adapter and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from loraplex.layers.classifier import CLASSIFIER_HEADS, LISTED_NOT_SAVED, is_classifier_key
from loraplex.layers.experts import EXPERT_PROJECTIONS
from loraplex.lora.added_tokens import (
    AddedTokens,
    VocabParts,
    count_added_tokens,
    is_original_copy,
    read_new_embeddings,
    token_delta_module,
    vocab_copy_module,
)
from loraplex.lora.errors import LoRAError, LoRANotFoundError
from loraplex.lora.expert_weights import (
    FUSED_PARAMETERS,
    ExpertsShape,
    check_expert,
    expert_target,
    fused_parameter,
    peft_swapped,
    split_fused,
)
from loraplex.lora.full_vocab import MODULES as FULL_VOCAB_MODULES
from loraplex.lora.request import LoRARequest
from loraplex.lora.tower import TOWER_PREFIX
from loraplex.models.text_only import TextOnly

logger = logging.getLogger(__name__)


@dataclass
class LoRAModuleWeights:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r], scaling folded in
    magnitude: torch.Tensor | None = None  # [out] fp32: DoRA's m (None: plain LoRA)
    bias: torch.Tensor | None = None  # [out]: lora_B's bias (PEFT's lora_bias), scaled


@dataclass
class LoRAModel:
    """One adapter as read and validated, PEFT's way: keys are HF module names
    (`...q_proj`), scaling folded into B. LoRAManager.pack lays it out for the slots."""

    lora_int_id: int
    name: str
    path: str
    rank: int
    modules: dict[str, LoRAModuleWeights]
    added_tokens: AddedTokens | None = None
    # a mixture of experts' experts: our experts layer -> (expert, "gate" | "up" | "down")
    # -> its weights (lora/expert_weights.py)
    experts: dict[str, dict[tuple[int, str], LoRAModuleWeights]] = field(default_factory=dict)
    # fully trained tables (modules_to_save): "embed_tokens" | "lm_head" -> [vocab, hidden]
    full_vocab: dict[str, torch.Tensor] = field(default_factory=dict)
    rope_factor: float = 1.0  # long-context LoRA: its tokens' rope scaled linearly by this


@dataclass
class PackedLoRA:
    """An adapter as the host tier keeps it: for each LoRA layer it touches, its weights
    in the layout of one slot of that layer (LinearWithLoRA.pack): A [r, n, in] and
    B [sum(out_k), r]. Copying it into a slot is then two copies per layer."""

    lora_int_id: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    added_tokens: AddedTokens | None = None
    path: str | None = None  # the directory it was read from (its tokenizer's)
    full_vocab: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRAModel's
    rope_factor: float = 1.0  # LoRAModel's
    dora: bool = False  # some layer scales its rows (DoRA): decoded outside CUDA graphs
    bias: bool = False  # some layer adds lora_B's bias (lora_bias): likewise


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
    extra_vocab_size: int = 0  # most tokens an adapter may add (lora_extra_vocab_size)
    lm_head_bias: bool = False  # the base's lm_head has a bias (Phi): no added tokens
    tied_embeddings: bool = False  # lm_head is the embedding: an added token's rows too
    experts: dict[str, ExpertsShape] = field(default_factory=dict)  # a MoE's experts layers
    # an HF module path component -> ours (Mixtral's `mlp` in transformers 5: our
    # block_sparse_moe, its checkpoints' name)
    aliases: dict[str, str] = field(default_factory=dict)
    unserved: tuple[str, ...] = ()  # supported names left without slots (lora_target_modules)
    full_vocab: bool = False  # slots hold whole embed_tokens / lm_head (modules_to_save)
    max_position: int | None = None  # the base's max_position_embeddings (None: unknown)
    long_lora_factors: tuple[float, ...] = ()  # rope tables for long-context LoRA
    # a multimodal base served on text (models/text_only.py): adapters trained on the
    # whole model name its language model otherwise, and may have LoRA on its vision tower
    text_only: TextOnly | None = field(default=None, compare=False)
    # a classify runner: an adapter's own classifier head (modules_to_save score /
    # classifier) is allowed, read apart by the engine (layers/classifier.py)
    classifier_heads: bool = False
    # --enable-tower-connector-lora (lora/tower.py): an adapter's tower / projector module
    # name -> the tower's own (VisionWeights.ours); None: those modules are left out
    tower: Callable[[str], str | None] | None = field(default=None, compare=False)
    # module names (any path component) the model refuses LoRA on -> why (Gemma 3n's
    # AltUp linears: the model's lora_refused_modules)
    refused: dict[str, str] = field(default_factory=dict)
    # modules (our names) whose LoRA weights are dropped: they compute nothing here (the
    # model's lora_ignored_modules: Gemma 3n's KV-sharing layers' k/v_proj, which
    # transformers 4.56 builds, and PEFT targets, but never runs with a cache)
    ignored: frozenset[str] = frozenset()

    def refusal(self, name: str, target: str) -> LoRAError | None:
        """The error for an adapter's target the model refuses by name; None if it does
        not."""
        why = next((self.refused[p] for p in target.split(".") if p in self.refused), None)
        return None if why is None else LoRAError(
            f"LoRA adapter {name!r} targets {target!r}: {why}")

    def ours(self, module: str) -> str | None:
        """An adapter's module name as this model names it; None for a multimodal base's
        vision tower or projector, unless they have adapter slots (TOWER_PREFIX + the
        tower's own name)."""
        if self.text_only is not None:
            text = self.text_only.name(module)
            if text is None:
                tower = self.tower(module) if self.tower is not None else None
                return None if tower is None else TOWER_PREFIX + tower
            module = text
        if module.startswith(("layers.", "embed_tokens", "norm")):  # trained over a headless
            module = "model." + module  # `*Model` (AutoModel: an embedding model's names)
        if not self.aliases:
            return module
        # (an alias to "" drops the component: OPT's model.decoder.layers, our model.layers)
        return ".".join(p for p in (self.aliases.get(part, part) for part in module.split("."))
                        if p)

    def no_slots(self, leaf: str) -> bool:
        """The model has `leaf` but the engine gave it no adapter slots
        (lora_target_modules)."""
        if leaf in self.unserved:
            return True
        return "experts" in self.unserved and leaf in (*EXPERT_PROJECTIONS, *FUSED_PARAMETERS) \
            and leaf not in self.leaves

    def no_slots_error(self, name: str, target: str) -> LoRAError:
        served = " ".join(n for n in self.suffixes if n not in self.unserved)
        return LoRAError(f"LoRA adapter {name!r} targets {target!r}, which has no adapter "
                         f"slots: the engine was started with --lora-target-modules {served}; "
                         "restart with it among them")

    @cached_property
    def leaves(self) -> frozenset[str]:
        """The leaf names an adapter's target_modules may use (the model's: computed once,
        not for every adapter registered)."""
        leaves = {m.rsplit(".", 1)[-1] for m in self.shapes}
        leaves |= {theirs for theirs, ours in self.aliases.items() if ours in leaves}
        if self.experts:
            leaves |= {"experts", *EXPERT_PROJECTIONS}
        return frozenset(leaves)


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
    if cfg.get("lora_bias") and cfg.get("use_dora"):  # PEFT refuses it too
        raise LoRAError(f"LoRA adapter {name!r} has lora_bias=true with use_dora=true, which "
                        "PEFT does not define")
    saved = [m for m in cfg.get("modules_to_save") or []
             if not (targets.classifier_heads and m.rsplit(".", 1)[-1] in CLASSIFIER_HEADS)
             and m.rsplit(".", 1)[-1] not in LISTED_NOT_SAVED]
    if saved:
        others = [m for m in saved if m.rsplit(".", 1)[-1] not in FULL_VOCAB_MODULES]
        if others:
            raise LoRAError(f"LoRA adapter {name!r} has modules_to_save={saved}: fully "
                            f"trained {', '.join(others)} are not supported (embed_tokens and "
                            "lm_head are, with --enable-lora-modules-to-save)")
        if not targets.full_vocab:
            raise LoRAError(f"LoRA adapter {name!r} has modules_to_save={saved}: fully trained "
                            "embed_tokens / lm_head need the engine started with "
                            "--enable-lora-modules-to-save (each slot then holds both tables)")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {max(ranks)} > max_lora_rank="
                        f"{max_rank}; restart with --max-lora-rank {max(ranks)}")
    leaves = targets.leaves
    for t in cfg.get("target_parameters") or []:
        module, _, param = t.rpartition(".")
        if targets.no_slots(param if param != "weight" else module.rsplit(".", 1)[-1]):
            raise targets.no_slots_error(name, t)
        if not ((param in FUSED_PARAMETERS and targets.experts)
                or (param == "weight" and module.rsplit(".", 1)[-1] in leaves)):
            raise LoRAError(f"LoRA adapter {name!r} targets the parameter {t!r}, which is not "
                            "in the model (supported: the experts' " + ", ".join(
                                FUSED_PARAMETERS) + " in a mixture of experts, and the "
                            "weight of a module LoRA may target)")
    target = cfg.get("target_modules")
    vision = targets.text_only.vision_leaves if targets.text_only else ()
    if isinstance(target, list):
        for t in target:
            if (refused := targets.refusal(name, t)) is not None:
                raise refused
            if targets.no_slots(t.rsplit(".", 1)[-1]):
                raise targets.no_slots_error(name, t)
            if t.rsplit(".", 1)[-1] not in leaves and t.rsplit(".", 1)[-1] not in vision:
                raise LoRAError(f"LoRA adapter {name!r}: target module {t!r} not found in the "
                                "model (supported: " + ", ".join(targets.suffixes) + "); the "
                                "adapter was trained for a different architecture")


def long_context_factor(name: str, cfg: dict, targets: TargetShapes) -> float:
    """Long-context LoRA (LongLoRA), by vLLM's rule: an adapter_config.json `context_length`
    past the base's max_position_embeddings means rope scaled linearly by
    ceil(context_length / max_position_embeddings), which the engine serves only when
    started with that factor (its rope table). 1.0: an ordinary adapter."""
    if cfg.get("rope_scaling"):
        raise LoRAError(f"LoRA adapter {name!r} has rope_scaling={cfg['rope_scaling']} in "
                        "adapter_config.json, which is not read: a long-context LoRA says "
                        "its length with context_length")
    length, base = cfg.get("context_length") or 0, targets.max_position
    if not base or length <= base:
        return 1.0
    factor = float(math.ceil(length / base))
    if factor not in targets.long_lora_factors:
        started = (" (it was started with --long-lora-scaling-factors "
                   + ",".join(f"{f:g}" for f in targets.long_lora_factors) + ")"
                   if targets.long_lora_factors else "")
        raise LoRAError(f"LoRA adapter {name!r} is a long-context LoRA: context_length="
                        f"{length} is {factor:g} x the base's {base} positions; start the "
                        f"engine with --long-lora-scaling-factors including {factor:g}"
                        + started)
    return factor


def check_adapter_config(req: LoRARequest, targets: TargetShapes, max_rank: int) -> int:
    """The cheap part of validation (no weights read): what registration checks, so that
    thousands of adapters can be registered and loaded only when a request needs them.
    Returns how many tokens the adapter adds to the vocabulary (from the weight files'
    headers). A hub id is checked when it is fetched (and counts 0 until then)."""
    path = local_adapter_dir(req)
    if path is None:
        return 0
    cfg = _read_config(req.lora_name, path)
    _check_config(req.lora_name, cfg, max_rank, targets)
    long_context_factor(req.lora_name, cfg, targets)
    return count_added_tokens(req.lora_name, path, cfg, targets)


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
# PEFT's lora_bias: lora_B is a Linear with a bias
_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
# PEFT's embedding LoRA: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r], saved
# without ".weight" (they are parameters, not modules)
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_"
                            r"(?P<ab>[AB])(?:\.[^.]+)?$")


# DoRA's magnitude: a parameter ("...lora_magnitude_vector"); PEFT before 0.12 saved the
# module's weight ("...lora_magnitude_vector.weight")
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector"
                            r"(?:\.[^.]+)?(?:\.weight)?$")


def _module_name(name: str, key: str) -> tuple[str, str]:
    """(HF module name, "lora_A" | "lora_B" | "magnitude" | "bias") of a LoRA weight's
    key."""
    m = _MAGNITUDE_KEY.match(key)
    if m is not None:
        return m.group("module"), "magnitude"
    m = _BIAS_KEY.match(key)
    if m is not None:
        return m.group("module"), "bias"
    m = _KEY.match(key)
    if m is not None:
        return m.group("module"), m.group("kind")
    m = _EMBEDDING_KEY.match(key)
    if m is not None:
        return m.group("module"), "lora_" + m.group("ab")
    raise LoRAError(f"LoRA adapter {name!r}: unexpected tensor {key!r} (not a LoRA A/B "
                    "weight); saved modules other than embed_tokens / lm_head are not "
                    "supported")


def load_adapter(req: LoRARequest, targets: TargetShapes, max_rank: int,
                 dtype: torch.dtype) -> LoRAModel:
    """Read, validate and scale one adapter (host memory). Thread-safe: touches no state."""
    name = req.lora_name
    path = resolve_adapter_path(req)
    cfg = _read_config(name, path)
    _check_config(name, cfg, max_rank, targets)
    rope_factor = long_context_factor(name, cfg, targets)
    count_added_tokens(name, path, cfg, targets)  # registration's checks (a hub id's too)
    vocab = VocabParts(name, targets)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unused: set[str] = set()  # on a multimodal base's vision tower: text never runs it
    for key, tensor in _read_tensors(name, path).items():
        if is_original_copy(key) or (targets.classifier_heads and is_classifier_key(key)):
            continue  # a classifier head: the engine's (layers/classifier.py)
        if key.endswith("lm_head.base_layer.bias") and cfg.get("bias", "none") == "none":
            continue  # a biased lm_head's (GPT-J's) own bias, saved beside a copy of its
            # weight (PEFT's save_embedding_layers): with bias="none", never trained
        if (module := vocab_copy_module(key)) is not None:
            if (ours := targets.ours(module)) is not None:
                vocab.add_copy(key, ours, tensor)
        elif (module := token_delta_module(key)) is not None:
            if (ours := targets.ours(module)) is not None:
                vocab.add_delta(ours, tensor)
        else:
            module, kind = _module_name(name, key)
            if targets.ours(module) is None:
                unused.add(module)
                continue
            if targets.ours(module) in targets.ignored:  # (Gemma 3n: see `ignored`)
                continue
            pairs.setdefault(module, {})[kind] = tensor
    images = targets.text_only is not None and targets.text_only.images
    if not pairs:
        raise LoRAError(f"LoRA adapter {name!r}: no LoRA weights in {path}" + (
            "" if not unused else " but on the vision tower / projector, which LoRA is not "
            "applied to (the language model only)" if images else
            " but on the vision tower, which serving on text never runs"))
    if unused and targets.tower is not None:  # parts of the checkpoint the tower never runs
        logger.warning("LoRA adapter %r: %d modules the vision tower / projector never runs "
                       "left out", name, len(unused))
    elif unused and images:  # vLLM's rule too: its image requests differ from the trained model
        logger.warning("LoRA adapter %r: %d modules on the vision tower / projector left out "
                       "(LoRA applies to the language model only)", name, len(unused))
    elif unused:
        logger.info("LoRA adapter %r: %d modules on the vision tower / projector left out "
                    "(text requests never run them)", name, len(unused))
    scaling = _Scaling(cfg)
    modules: dict[str, LoRAModuleWeights] = {}
    experts: dict[str, dict[tuple[int, str], LoRAModuleWeights]] = {}
    for hf_module, ab in pairs.items():
        module = targets.ours(hf_module)
        magnitude = _dora_magnitude(name, hf_module, ab, bool(cfg.get("use_dora")))
        bias = ab.pop("bias", None)
        if bias is not None and not cfg.get("lora_bias"):
            raise LoRAError(f"LoRA adapter {name!r} has a lora_B bias for {hf_module!r} but "
                            "lora_bias is not true in adapter_config.json")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoRAError(f"LoRA adapter {name!r}: module {hf_module!r} lacks its "
                            f"{'lora_B' if 'lora_A' in ab else 'lora_A'} weight")
        if magnitude is not None and (module.rsplit(".", 1)[-1] in FULL_VOCAB_MODULES
                                      or expert_target(module, targets.experts) is not None):
            raise LoRAError(f"LoRA adapter {name!r} uses DoRA on {hf_module!r}: DoRA is "
                            "supported on linear projections, not on embed_tokens, lm_head "
                            "or a mixture of experts' experts")
        if bias is not None and (module.rsplit(".", 1)[-1] in FULL_VOCAB_MODULES
                                 or expert_target(module, targets.experts) is not None):
            raise LoRAError(f"LoRA adapter {name!r} has a lora_B bias (lora_bias) on "
                            f"{hf_module!r}: supported on linear projections, not on "
                            "embed_tokens, lm_head or a mixture of experts' experts")
        if (on_experts := expert_target(module, targets.experts)) is not None:
            _add_experts(name, hf_module, ab, on_experts, targets, scaling, max_rank, dtype,
                         experts)
            continue
        if module not in targets.shapes and module.startswith(TOWER_PREFIX):
            raise LoRAError(f"LoRA adapter {name!r}: {hf_module!r} on the tower / projector "
                            "is not one of its linear layers (LoRA on the tower serves its "
                            "nn.Linear layers only)")
        if module not in targets.shapes and (refused := targets.refusal(name, hf_module)):
            raise refused
        if module not in targets.shapes:
            leaf = "experts" if ".experts." in f"{module}." else module.rsplit(".", 1)[-1]
            if targets.no_slots(leaf):
                raise targets.no_slots_error(name, hf_module)
            raise LoRAError(f"LoRA adapter {name!r}: target module {hf_module!r} not found in "
                            "the model (supported: " + ", ".join(targets.suffixes) + ")")
        # a resized embed_tokens / lm_head: the added tokens' part goes into their rows
        a, b = vocab.split_lora(module, ab["lora_A"], ab["lora_B"].float() * scaling(hf_module))
        in_f, out_f = targets.shapes[module]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, rank):
            raise LoRAError(f"LoRA adapter {name!r}: {module} has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}, which do not fit the base layer (in={in_f}, "
                            f"out={out_f}); the adapter was trained for another base model")
        _check_rank(name, rank, max_rank)
        if magnitude is not None and magnitude.shape != (out_f,):
            raise LoRAError(f"LoRA adapter {name!r}: {hf_module}'s lora_magnitude_vector has "
                            f"shape {tuple(magnitude.shape)}, not ({out_f},)")
        if bias is not None and bias.shape != (out_f,):
            raise LoRAError(f"LoRA adapter {name!r}: {hf_module}'s lora_B bias has shape "
                            f"{tuple(bias.shape)}, not ({out_f},)")
        modules[module] = LoRAModuleWeights(
            lora_a=a.to(dtype).contiguous(), lora_b=b.to(dtype).contiguous(),
            magnitude=magnitude,  # PEFT: lora_B(lora_A(x)) * s, its bias scaled too
            bias=None if bias is None else (bias.float() * scaling(hf_module)).to(dtype))
    added = vocab.added_tokens(cfg, read_new_embeddings(name, path))
    if added is not None:
        added = AddedTokens(added.input_embeddings.to(dtype), added.output_embeddings.to(dtype))
    every = [*modules.values(), *(w for parts in experts.values() for w in parts.values())]
    return LoRAModel(lora_int_id=req.lora_int_id, name=name, path=path,
                     rank=max(w.lora_a.shape[0] for w in every), modules=modules,
                     added_tokens=added, experts=experts,
                     full_vocab={k: v.to(dtype) for k, v in vocab.full.items()},
                     rope_factor=rope_factor)


def _dora_magnitude(name: str, hf_module: str, weights: dict[str, torch.Tensor],
                    use_dora: bool) -> torch.Tensor | None:
    """Take the module's DoRA magnitude out of `weights` (fp32; None for plain LoRA), and
    check that it is there exactly when adapter_config.json says use_dora."""
    magnitude = weights.pop("magnitude", None)
    if use_dora and magnitude is None:
        raise LoRAError(f"LoRA adapter {name!r} has use_dora=true but no "
                        f"lora_magnitude_vector for {hf_module!r}")
    if magnitude is not None and not use_dora:
        raise LoRAError(f"LoRA adapter {name!r} has a lora_magnitude_vector for "
                        f"{hf_module!r} (DoRA) but use_dora is not true in adapter_config.json")
    return None if magnitude is None else magnitude.float()


class _Scaling:
    """s = lora_alpha / r (or / sqrt(r), rsLoRA) of a module, by PEFT's patterns."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    def rank(self, module: str) -> int:
        return _pattern_value(module, self.cfg.get("rank_pattern") or {}, self.cfg.get("r", 8))

    def __call__(self, module: str) -> float:
        r = self.rank(module)
        alpha = _pattern_value(module, self.cfg.get("alpha_pattern") or {},
                               self.cfg.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r


def _check_rank(name: str, rank: int, max_rank: int) -> None:
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {rank} > max_lora_rank={max_rank}; "
                        f"restart with --max-lora-rank {rank}")


def _add_experts(name: str, hf_module: str, ab: dict[str, torch.Tensor],
                 on_experts: tuple[str, int | None, str | None], targets: TargetShapes,
                 scaling: _Scaling, max_rank: int, dtype: torch.dtype,
                 out: dict[str, dict[tuple[int, str], LoRAModuleWeights]]) -> None:
    """One LoRA pair on a mixture of experts' experts, per expert and projection, into
    `out` (lora/expert_weights.py: the two PEFT formats)."""
    layer, expert, proj = on_experts
    shape = targets.experts[layer]
    a, b = ab["lora_A"], ab["lora_B"]
    if expert is not None:
        check_expert(name, layer, expert, proj, a, b, shape)
        parts = {(expert, proj): (a, b.float() * scaling(hf_module))}
    else:  # transformers 5's ParamWrapper on the 3-D gate_up_proj or down_proj
        param, swapped = fused_parameter(name, layer, a, b, shape,
                                         peft_swapped(shape, scaling.cfg.get("peft_version")))
        param_name = re.sub(r"(\.base_layer)+$", "", hf_module) + "." + param
        r = scaling.rank(param_name)
        if a.shape[0] != r * shape.num_experts:
            raise LoRAError(f"LoRA adapter {name!r}: {param_name}'s A has "
                            f"{a.shape[0]} rows, not r x experts = {r} x "
                            f"{shape.num_experts} (adapter_config.json's r / rank_pattern)")
        parts = split_fused(param, a, b.float() * scaling(param_name), shape, swapped)
    for key, (a_x, b_x) in parts.items():
        _check_rank(name, a_x.shape[0], max_rank)
        if key in out.setdefault(layer, {}):
            raise LoRAError(f"LoRA adapter {name!r} has two LoRAs on expert {key[0]}'s "
                            f"{key[1]} projection in {layer}")
        out[layer][key] = LoRAModuleWeights(lora_a=a_x.to(dtype).contiguous(),
                                            lora_b=b_x.to(dtype).contiguous())

"""LoRAX's `merged_adapters`: several LoRA adapters merged into one, per request.

A merge is a new PEFT directory built from the source adapters' tensors and then served
like any adapter (registered once, loaded and evicted by the same LRUs). LoRAX's rule
(server/lorax_server/utils/merges): lora_A and lora_B are merged *separately*, each
module over the adapters that have it, with the same per-adapter weight on both:

    A = merge_i(A_i, w_i * sqrt(s_i))    B = merge_i(B_i, w_i * sqrt(s_i))    s = 1

`s_i` is adapter i's own alpha / r (alpha / sqrt(r) with rsLoRA): split as sqrt(s_i) on
A and B, PEFT's way (add_weighted_adapter), so the merged adapter has scaling 1. With
equal scalings this is exactly LoRAX's result (LoRAX applies the first adapter's scaling
to all); with different ones each adapter keeps its own. merge is one of:

    linear       sum_i w_i T_i
    ties         TIES: keep each T_i's `density` largest |values|, elect each entry's
                 sign (over the unweighted T_i), average the weighted entries of that sign
    dare_linear  DARE: drop entries at random (keep with p = density), rescale by
                 1 / density, then linear
    dare_ties    DARE's pruning, then TIES' sign election and disjoint mean

DARE's randomness is seeded from the merge (`tensor_seed`), so one merge always gives one
adapter. Every strategy needs equal ranks (A and B are merged entry by entry).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.lora.adapter import _module_name, _read_config, _read_tensors, _Scaling
from loraplex.lora.errors import LoRAError
from loraplex.lora.request import LoRARequest

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
_PRUNED = ("ties", "dare_linear", "dare_ties")  # strategies that read `density`
_ELECTED = ("ties", "dare_ties")  # strategies that read `majority_sign_method`


@dataclass(frozen=True)
class MergeSpec:
    """What a request asks to merge (LoRAX's `merged_adapters`), normalized: fields a
    strategy does not read are None, so two requests for one merge have one `key`."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float | None = None
    majority_sign_method: str | None = None

    @classmethod
    def parse(
        cls,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: str | None = None,
        density: float | None = None,
        majority_sign_method: str | None = None,
    ) -> MergeSpec:
        """Validate LoRAX's fields; a ValueError names the field and what is wrong.
        Missing `weights` are all 1 (LoRAX's documented default)."""
        if (
            not isinstance(ids, list | tuple)
            or not ids
            or not all(isinstance(i, str) and i for i in ids)
        ):
            raise ValueError("merged_adapters.ids must be a non-empty list of adapter ids")
        weights = [1.0] * len(ids) if weights is None else weights
        if not isinstance(weights, list | tuple) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
            for w in weights
        ):
            raise ValueError("merged_adapters.weights must be a list of numbers")
        if len(weights) != len(ids):
            raise ValueError(
                f"merged_adapters has {len(ids)} ids but {len(weights)} "
                "weights: give one weight per adapter"
            )
        strategy = (merge_strategy or "linear").lower()
        if strategy not in STRATEGIES:
            raise ValueError(
                f"merged_adapters.merge_strategy {merge_strategy!r} is not one "
                f"of {', '.join(STRATEGIES)}"
            )
        bad_density = (
            density is None
            or isinstance(density, bool)
            or not isinstance(density, int | float)
            or not 0 < density <= 1
        )
        if strategy in _PRUNED and bad_density:
            raise ValueError(
                f"merged_adapters.density must be in (0, 1] for {strategy} (the "
                f"fraction of each adapter's entries kept), got {density!r}"
            )
        sign = (majority_sign_method or "total").lower()
        if sign not in SIGN_METHODS:
            raise ValueError(
                f"merged_adapters.majority_sign_method {majority_sign_method!r} "
                f"is not one of {', '.join(SIGN_METHODS)}"
            )
        return cls(
            ids=tuple(ids),
            weights=tuple(float(w) for w in weights),
            strategy=strategy,
            density=float(density) if strategy in _PRUNED else None,
            majority_sign_method=sign if strategy in _ELECTED else None,
        )

    @property
    def key(self) -> str:
        """A stable digest of the merge (the cache's key, DARE's seed)."""
        return self.digest(
            json.dumps(
                [self.ids, self.weights, self.strategy, self.density, self.majority_sign_method]
            )
        )

    @staticmethod
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()


def tensor_seed(spec: MergeSpec, name: str) -> int:
    """DARE's seed for one merged tensor (`name`: its key): the same merge drops the same
    entries every time, on every server."""
    return int(hashlib.sha256(f"{spec.key}|{name}".encode()).hexdigest()[:15], 16)


# ---- the math (one merged tensor from the adapters' tensors) ---------------------------
def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the int(density * numel) entries of largest |value|."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return t * keep.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability `density`, rescaled by 1 / density
    so its expected value is unchanged (LoRAX's code computes the rescale but drops the
    result, a bug; its docs, the paper and PEFT rescale)."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' sign election over the unweighted tensors [n, ...]: per entry the sign of the
    summed values ("total") or of the count of signs ("frequency"), ties positive; the
    mask of the entries that agree with it."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1.0, -1.0)


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    spec: MergeSpec,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """One merged tensor (fp32) from the adapters' same-shaped tensors and their weights."""
    ts = [t.float() for t in tensors]
    if spec.strategy in ("ties",):
        ts = [magnitude_prune(t, spec.density) for t in ts]
    elif spec.strategy in ("dare_linear", "dare_ties"):
        assert gen is not None, "DARE needs its seeded generator"
        ts = [random_prune(t, spec.density, gen) for t in ts]
    stacked = torch.stack(ts)
    weighted = stacked * weights.float().reshape(-1, *([1] * (stacked.dim() - 1)))
    if spec.majority_sign_method is None:  # linear, dare_linear
        return weighted.sum(dim=0)
    agree = elect_sign(stacked, spec.majority_sign_method)
    # disjoint mean: the weighted entries of the elected sign over how many there are
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


# ---- adapters -------------------------------------------------------------------------
@dataclass
class _Source:
    name: str
    cfg: dict
    pairs: dict[tuple[str, str], tuple[str, torch.Tensor]]  # (module, A|B) -> (key, tensor)


def _read_source(name: str, path: str) -> _Source:
    """A plain LoRA adapter's config and A / B tensors; anything else is refused."""
    cfg = _read_config(name, path)
    refused = [
        f
        for f in ("use_dora", "modules_to_save", "trainable_token_indices", "target_parameters")
        if cfg.get(f)
    ]
    pairs = {}
    for key, tensor in _read_tensors(name, path).items():
        try:
            module, kind = _module_name(name, key)
        except LoRAError:
            kind = "other"
        if kind not in ("lora_A", "lora_B"):
            refused.append(key)
            continue
        pairs[module, kind] = key, tensor
    if refused:
        raise LoRAError(
            f"merged_adapters: adapter {name!r} has {', '.join(refused[:3])}: "
            "only plain LoRA adapters (A and B weights) can be merged"
        )
    return _Source(name, cfg, pairs)


def _check_ranks(sources: list[_Source], strategy: str) -> int:
    ranks = {
        s.name: {int(t.shape[0]) for (_, kind), (_, t) in s.pairs.items() if kind == "lora_A"}
        for s in sources
    }
    if len(set().union(*ranks.values())) != 1:
        said = ", ".join(f"{n!r} rank {'/'.join(map(str, sorted(r)))}" for n, r in ranks.items())
        raise LoRAError(
            f"merged_adapters: {strategy} merges A and B entry by entry, so the "
            f"adapters must have one rank, but {said}"
        )
    return next(iter(next(iter(ranks.values()))))


def _target_modules(sources: list[_Source]) -> list[str] | str:
    """The union of the sources' target_modules (PEFT's: regexes joined by `|`)."""
    targets = [s.cfg.get("target_modules") or [] for s in sources]
    if all(isinstance(t, list) for t in targets):
        return sorted({m for t in targets for m in t})
    return "|".join(
        f"({t})" if isinstance(t, str) else "(" + "|".join(rf".*\.{re.escape(m)}$" for m in t) + ")"
        for t in targets
    )


def merge_adapter_dirs(spec: MergeSpec, paths: Sequence[str], out_dir: str) -> str:
    """Merge the PEFT adapters at `paths` (named by spec.ids) into a PEFT directory at
    `out_dir` (adapter_config.json with r = lora_alpha = rank, fp32 safetensors)."""
    from safetensors.torch import save_file

    sources = [_read_source(name, path) for name, path in zip(spec.ids, paths, strict=True)]
    rank = _check_ranks(sources, spec.strategy)
    scalings = [_Scaling(s.cfg) for s in sources]
    merged: dict[str, torch.Tensor] = {}
    for module, kind in dict.fromkeys(k for s in sources for k in s.pairs):
        have = [i for i, s in enumerate(sources) if (module, kind) in s.pairs]
        key = sources[have[0]].pairs[module, kind][0]
        weights = torch.tensor(
            [spec.weights[i] * math.sqrt(scalings[i](module)) for i in have], dtype=torch.float32
        )
        gen = torch.Generator().manual_seed(tensor_seed(spec, key))
        merged[key] = merge_tensors(
            [sources[i].pairs[module, kind][1] for i in have], weights, spec, gen
        ).contiguous()
    cfg = {
        k: v
        for k, v in sources[0].cfg.items()
        if k not in ("rank_pattern", "alpha_pattern", "use_rslora")
    }
    cfg.update(r=rank, lora_alpha=rank, target_modules=_target_modules(sources))
    os.makedirs(out_dir, exist_ok=True)
    save_file(merged, os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def merged_lora_request(
    spec: MergeSpec,
    sources: Sequence[LoRARequest],
    out_dir: str,
    lora_int_id: int,
    lora_name: str | None = None,
) -> LoRARequest:
    """Offline API: merge the adapters `sources` (in spec.ids' order) into `out_dir` and
    return the LoRARequest that serves the result."""
    from loraplex.lora.adapter import resolve_adapter_path

    paths = [resolve_adapter_path(r) for r in sources]
    merge_adapter_dirs(spec, paths, out_dir)
    return LoRARequest(lora_name or f"merged-{spec.key[:12]}", lora_int_id, out_dir)

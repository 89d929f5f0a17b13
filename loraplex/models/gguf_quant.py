"""A GGUF file's Q8_0 and Q4_0 matrices kept quantized, in GPTQ's packed layout.

Both are a symmetric integer code per weight times an fp16 scale per block of 32 inputs:

    Q8_0   w = d * q          q int8          (34 bytes a block: d, then 32 codes)
    Q4_0   w = d * (q - 8)    q in 0 .. 15    (18 bytes: d, then 16 bytes whose low
                                               nibbles are inputs 0-15, high ones 16-31)

which GPTQ (layers/quantization/linear.py) holds exactly: group_size 32, 8 bits with q + 128
and a zero point of 128, or 4 bits with q and a zero point of 8, the scale d kept in fp16.
So the codes move into GPTQLinear / PackedIntFusedExperts as they are (no float round
trip), and LoRA runs on top as on a GPTQ base. `GGUFQuantPlan` says which tensors: those of
the file's most used of the two types (by weights) in the decoder's linears and experts;
the embeddings, lm_head and the routers stay plain (as for GPTQ checkpoints), and so does
a linear packed with a sibling of another type (q/k/v, gate/up, a layer's experts), and
every tensor of another type (K-quants, F16 ...), all dequantized as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

QK = 32  # inputs per block: the GPTQ group size
# ggml type name -> bits of its codes
KEPT_TYPES = {"Q8_0": 8, "Q4_0": 4}
# GGUF tensors that stay plain whatever their type: embeddings, lm_head, the routers
PLAIN = re.compile(r"(token_embd|output|blk\.\d+\.ffn_gate_inp(_shexp)?)\.weight")
# sub-projections loraplex packs into one linear, which must be all kept or all plain
SIBLINGS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
            "up_proj": "gate_up"}
_EXPERT = re.compile(r"(?P<layer>.+\.experts)\.\d+\.\w+")


def gptq_config(bits: int, skipped: list[str]) -> dict[str, Any]:
    """The quantization_config a plan stands for (layers/quantization/config.py reads it)."""
    return {"quant_method": "gguf", "gptq_layout": True, "bits": bits, "group_size": QK,
            "modules_to_not_convert": ["re:" + re.escape(m) + "$" for m in skipped]}


@dataclass
class GGUFQuantPlan:
    bits: int | None  # None: nothing kept
    kept: frozenset[str]  # GGUF tensor names kept packed
    skipped: list[str]  # HF modules of the decoder's linears that stay plain

    @property
    def type_name(self) -> str:
        return {8: "Q8_0", 4: "Q4_0"}.get(self.bits or 0, "")


def quant_plan(tensors: list[Any], modules_of: dict[str, list[str]]) -> GGUFQuantPlan:
    """Which of the file's tensors (GGUFReader's) stay packed. `modules_of`: GGUF tensor
    name -> the HF modules it fills (an expert stack: every expert's), for its matrices."""
    candidates = [t for t in tensors if t.name in modules_of and not PLAIN.fullmatch(t.name)]
    weights = {name: sum(int(t.n_elements) for t in candidates if t.tensor_type.name == name)
               for name in KEPT_TYPES}
    type_name = max(weights, key=weights.__getitem__)
    if not weights[type_name]:
        return GGUFQuantPlan(None, frozenset(), [])
    bits = KEPT_TYPES[type_name]
    per = 32 // bits
    kept = {t.name for t in candidates if t.tensor_type.name == type_name
            and int(t.shape[1]) % per == 0}  # GPTQ packs its zeros along the outputs
    # a packed layer (or a layer's experts) is kept whole or not at all
    group_of: dict[str, str] = {}
    for name, modules in modules_of.items():
        for module in modules:
            prefix, _, leaf = module.rpartition(".")
            expert = _EXPERT.fullmatch(module)
            group_of[name] = expert["layer"] if expert else (
                f"{prefix}.{SIBLINGS[leaf]}" if leaf in SIBLINGS else module)
    plain_groups = {group_of[t.name] for t in candidates if t.name not in kept}
    kept = {n for n in kept if group_of[n] not in plain_groups}
    skipped = sorted({m for t in candidates if t.name not in kept for m in modules_of[t.name]})
    return GGUFQuantPlan(bits, frozenset(kept), skipped)


def codes_and_scales(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 / Q4_0 tensor's bytes ([..., rows, bytes per row], as GGUFReader maps them)
    -> (codes [..., rows, inputs] uint8: q + 128, or q, scales [..., rows, inputs / 32]
    fp16): w = scale * (code - 128), or scale * (code - 8)."""
    size = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2}[type_name]
    blocks = raw.reshape(*raw.shape[:-1], -1, size)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    body = np.ascontiguousarray(blocks[..., 2:])
    if type_name == "Q8_0":
        codes = (body.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        codes = np.concatenate([body & 15, body >> 4], axis=-1)
    return codes.reshape(*raw.shape[:-1], -1), scales


def _packed_words(values: np.ndarray, bits: int) -> np.ndarray:
    """[n * per, ...] small unsigned ints -> [n, ...] int32, value k of a word in bits
    bits * k (lowest first), as GPTQ packs."""
    per = 32 // bits
    grouped = values.astype(np.uint32).reshape(-1, per, *values.shape[1:])
    words = np.zeros(grouped.shape[:1] + grouped.shape[2:], dtype=np.uint32)
    for k in range(per):
        words |= grouped[:, k] << np.uint32(bits * k)
    return words.view(np.int32)


def to_gptq(codes: np.ndarray, scales: np.ndarray, bits: int) -> dict[str, torch.Tensor]:
    """One matrix's codes [out, in] and scales [out, in / 32] as a GPTQ (gptq_v2: zeros
    stored as they are) layer's qweight [in / per, out], qzeros [in / 32, out / per] (the
    midpoint, 2^(bits - 1), everywhere) and scales [in / 32, out] fp16."""
    out = codes.shape[0]
    zeros = np.full((scales.shape[1], out), 1 << (bits - 1), dtype=np.uint32)
    return {"qweight": torch.from_numpy(_packed_words(codes.T, bits)),
            "qzeros": torch.from_numpy(_packed_words(zeros.T, bits).T.copy()),
            "scales": torch.from_numpy(np.ascontiguousarray(scales.T))}


def packed_tensors(module: str, codes: np.ndarray, scales: np.ndarray, bits: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of one matrix's GPTQ tensors, under its HF module's name."""
    for kind, tensor in to_gptq(codes, scales, bits).items():
        yield f"{module}.{kind}", tensor

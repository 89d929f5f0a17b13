"""The batched LoRA ops: one interface, a torch and a Triton backend (same signatures).

    add_lora(y, x, a_stacked, b_stacked, lora_ranks, meta, output_sizes)   y += B[s] (A[s] x)
    lora_shrink(x, a_stacked, lora_ranks, meta) -> buf
    lora_expand(buf, b_stacked, y, lora_ranks, meta, output_sizes)

Shapes and semantics: torch_ops' docstring. Backend: Triton for CUDA tensors when triton
imports, torch otherwise; LORAPLEX_LORA_BACKEND=torch|triton forces one (triton on CPU
tensors runs under TRITON_INTERPRET=1, which tests use).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from loraplex import envs
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.ops import torch_ops

__all__ = ["add_lora", "backend", "lora_expand", "lora_shrink"]

_CHOICES = ("auto", "torch", "triton")


@functools.cache
def _triton_ops() -> ModuleType | None:
    try:
        from loraplex.lora.ops import triton_ops
    except ImportError:
        return None
    return triton_ops


def backend(x: torch.Tensor) -> ModuleType:
    """The module whose ops run on `x`: torch_ops or triton_ops."""
    choice = envs.LORAPLEX_LORA_BACKEND
    if choice not in _CHOICES:
        raise ValueError(f"LORAPLEX_LORA_BACKEND={choice!r}: expected one of {_CHOICES}")
    if choice == "torch" or (choice == "auto" and not x.is_cuda):
        return torch_ops
    ops = _triton_ops()
    if ops is not None:
        if not x.is_cuda and not ops._INTERPRETED:
            raise RuntimeError("LORAPLEX_LORA_BACKEND=triton on CPU tensors needs "
                               "TRITON_INTERPRET=1 when loraplex's kernels are first imported")
        return ops
    if choice == "triton":
        raise RuntimeError("LORAPLEX_LORA_BACKEND=triton but triton does not import")
    return torch_ops


def add_lora(y: torch.Tensor, x: torch.Tensor, a_stacked: torch.Tensor,
             b_stacked: torch.Tensor, lora_ranks: torch.Tensor, meta: LoRABatchMeta,
             output_sizes: list[int]) -> None:
    backend(x).add_lora(y, x, a_stacked, b_stacked, lora_ranks, meta, output_sizes)


def lora_shrink(x: torch.Tensor, a_stacked: torch.Tensor, lora_ranks: torch.Tensor,
                meta: LoRABatchMeta) -> torch.Tensor:
    return backend(x).lora_shrink(x, a_stacked, lora_ranks, meta)


def lora_expand(buf: torch.Tensor, b_stacked: torch.Tensor, y: torch.Tensor,
                lora_ranks: torch.Tensor, meta: LoRABatchMeta, output_sizes: list[int]) -> None:
    backend(y).lora_expand(buf, b_stacked, y, lora_ranks, meta, output_sizes)

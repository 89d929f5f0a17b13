"""The batched LoRA ops: one interface, a torch and a Triton backend (same signatures).

    add_lora(y, x, a_stacked, b_stacked, lora_ranks, meta, output_sizes)   y += B[s] (A[s] x)
    lora_shrink(x, a_stacked, lora_ranks, meta) -> buf
    lora_expand(buf, b_stacked, y, lora_ranks, meta, output_sizes)

Shapes and semantics: torch_ops' docstring. Backend: Triton for CUDA tensors when triton
imports, torch otherwise; LORAPLEX_LORA_BACKEND=torch|triton forces one (triton on CPU
tensors runs under TRITON_INTERPRET=1, which tests use).
"""

from __future__ import annotations

from types import ModuleType

import torch

from loraplex import envs
from loraplex.backends import triton_kernels
from loraplex.lora.meta import LoRABatchMeta
from loraplex.lora.ops import torch_ops

__all__ = ["add_lora", "backend", "lora_expand", "lora_shrink"]


def backend(x: torch.Tensor) -> ModuleType:
    """The module whose ops run on `x`: torch_ops or triton_ops."""
    kernels = triton_kernels("LORAPLEX_LORA_BACKEND", envs.LORAPLEX_LORA_BACKEND, x.is_cuda,
                             "loraplex.lora.ops.triton_ops")
    return torch_ops if kernels is None else kernels


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

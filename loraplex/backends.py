"""Torch or Triton: which kernels run a layer's op (LoRA ops, attention).

Triton for CUDA tensors when triton imports, the torch path otherwise; an env var
(`LORAPLEX_LORA_BACKEND`, `LORAPLEX_ATTENTION_BACKEND`) forces either. Triton on CPU
tensors runs only under TRITON_INTERPRET=1 (set before the kernels are imported), which
is how the tests hold the kernels against the torch path without a GPU.

Also what the Triton kernel modules share: the interpreter switch (`interpreter_on`),
when `tl.dot` runs in exact fp32 (`fp32_dot`), and how far to split a reduction over
programs (`plan_split_k`).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

CHOICES = ("auto", "torch", "triton")
TARGET_PROGRAMS = 4 * 132  # ~4 per SM of an H100: enough loads in flight to stream weights


@functools.cache
def optional_module(name: str) -> ModuleType | None:
    """The module of Triton kernels, or None where triton does not import."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def triton_kernels(env_var: str, choice: str, on_cuda: bool, module: str) -> ModuleType | None:
    """The Triton kernel module to use for this op, or None for the torch path."""
    if choice not in CHOICES:
        raise ValueError(f"{env_var}={choice!r}: expected one of {CHOICES}")
    if choice == "torch" or (choice == "auto" and not on_cuda):
        return None
    kernels = optional_module(module)
    if kernels is None:
        if choice == "triton":
            raise RuntimeError(f"{env_var}=triton but triton does not import")
        return None
    if not on_cuda and not kernels._INTERPRETED:
        raise RuntimeError(f"{env_var}=triton on CPU tensors needs TRITON_INTERPRET=1 when "
                           "loraplex's kernels are first imported")
    return kernels


def fix_interpreter_index() -> None:
    """Let Triton's interpreter (TRITON_INTERPRET=1) use a scalar as a loop bound under
    numpy >= 2.4.

    The interpreter holds a scalar as a 1-element array, and in triton 3.6 the
    tensor.__index__ it installs (what range() calls on a bound like tl.load(n_ptr)) is
    int(array), which numpy 2.4 refuses: "only 0-dimensional arrays can be converted to
    Python scalars" (triton-lang/triton#9171). Triton 3.8 on squeezes the array first; this
    wraps the interpreter's patching to do the same. Compiled kernels never see it.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, *scope):  # triton 3.2 patches in place, with no scope
        patch(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def interpreter_on() -> bool:
    """TRITON_INTERPRET=1 now, read by a kernel module when it is imported (that decides
    how its kernels are defined); if so, the interpreter is patched (fix_interpreter_index)."""
    on = os.getenv("TRITON_INTERPRET", "0") == "1"
    if on:
        fix_interpreter_index()
    return on


def fp32_dot(dtype: torch.dtype, interpreted: bool) -> bool:
    """Run tl.dot in exact fp32 for these inputs: fp32 ones, and bf16 under the
    interpreter, whose tl.dot mishandles bf16 (numpy has none)."""
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def plan_split_k(k: int, block_k: int, tiles: int, most: int | None = None,
            ways: int | None = None) -> tuple[int, int]:
    """(splits, k per split) for a reduction over `k` in `block_k` steps done by `tiles`
    programs per split: enough splits for TARGET_PROGRAMS programs (or `ways`), at most
    `most` and one per block; each split a whole number of blocks, so none is empty."""
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    if ways is None:
        ways = max(1, min(cdiv(k, block_k), cdiv(TARGET_PROGRAMS, tiles), most or k))
    k_per_split = cdiv(cdiv(k, ways), block_k) * block_k
    return cdiv(k, k_per_split), k_per_split


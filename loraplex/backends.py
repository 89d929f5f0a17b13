"""Torch or Triton: which kernels run a layer's op (LoRA ops, attention).

Triton for CUDA tensors when triton imports, the torch path otherwise; an env var
(`LORAPLEX_LORA_BACKEND`, `LORAPLEX_ATTENTION_BACKEND`) forces either. Triton on CPU
tensors runs only under TRITON_INTERPRET=1 (set before the kernels are imported), which
is how the tests hold the kernels against the torch path without a GPU.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

CHOICES = ("auto", "torch", "triton")


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

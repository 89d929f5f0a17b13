"""Triton kernels in tests without a GPU: import them under the interpreter, and compile
them for an H100 (sm_90).

The interpreter (TRITON_INTERPRET=1) accepts code the compiler rejects, so the kernel
tests also compile every launch they make for real. A test's script wraps the kernels in
`Capture` (records each launch instead of running it), calls the public ops on small CPU
tensors, and `compile_for_h100` compiles every recorded launch in a subprocess (without
TRITON_INTERPRET), checking each fits an H100's shared memory.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

_PRELUDE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
calls = []
types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
         torch.uint8: "u8"}
class Capture:
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *a, **kw: calls.append((self.fn, a, kw))
"""

_COMPILE_CALLS = """
for fn, args, kw in calls:
    sig = {n: "*" + types[v.dtype] if isinstance(v, torch.Tensor) else
           "fp32" if isinstance(v, float) else "i32" for n, v in zip(fn.arg_names, args)}
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    sig.update(dict.fromkeys(kw, "constexpr"))
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=kw),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kw, kernel.metadata.shared)
print("compiled", len(calls))
"""


def compile_for_h100(launches: str) -> int:
    """Run `launches` (script lines that wrap kernels in Capture and call the ops), compile
    every recorded launch for sm_90; returns how many compiled. Skips without ptxas."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("needs triton's ASTSource(constexprs=) (3.6 has it; 3.1 and 3.2 do not)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + launches + _COMPILE_CALLS],
                          capture_output=True, text=True, env=env, timeout=300)
    if "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton's CUDA backend (ptxas) is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("compiled")[-1])


def interpret_triton_language() -> None:
    """triton.jit reads TRITON_INTERPRET when a function is decorated, and transformers
    imports triton (via torch._dynamo) before a test module runs: triton's own jit'd
    helpers (tl.max, tl.zeros, ...) were then built for the GPU. Rebuild them for the
    interpreter. (Setting TRITON_INTERPRET=1 before triton is imported avoids this.)"""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        importlib.reload(tl.standard)
        importlib.reload(tl)


def import_kernels(name: str) -> ModuleType:
    """Import a module of Triton kernels; without CUDA with the interpreter on (it is read
    when the kernels are defined), so they run on CPU tensors."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def torch_and_triton(monkeypatch, kernels: ModuleType, run) -> tuple[dict[str, torch.Tensor],
                                                                      list]:
    """`run()` under LORAPLEX_QUANT_BACKEND torch, then triton: both outputs, and the
    layers `kernels.quant_matmul` was called with (by the triton run only: checked)."""
    calls, real = [], kernels.quant_matmul
    monkeypatch.setattr(kernels, "quant_matmul",
                        lambda x, layer: calls.append(layer) or real(x, layer))
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LORAPLEX_QUANT_BACKEND", backend)
        out[backend] = run()
        assert bool(calls) == (backend == "triton")
    return out, calls

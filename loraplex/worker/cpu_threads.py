"""One OpenMP team per process: the step loop's. Helper threads run torch ops alone.

With OpenMP (torch's Linux builds), every thread that runs a parallel torch op gets a
team of worker threads of its own, kept until that thread exits. Once the process has
more OpenMP threads than cores, libgomp stops spinning between parallel regions, so each
of the step loop's small ops (hundreds a step) waits for a sleeping worker to wake up.
Measured on 2 cores (tiny-cpu shape, batch 1): one adapter load on a loader thread
slowed every later decode step with LoRA from 26 to 46 ms, and stepping on another
thread than the one that built the model slowed a base step from 21 to 29 ms. So:

- the adapter loader's threads call `run_torch_ops_single_threaded` first: their copies
  are off the step loop, one core each is plenty;
- the async engine builds its LLMEngine on the thread that then steps it.
"""

from __future__ import annotations

import ctypes
import functools
import re
from collections.abc import Callable
from pathlib import Path

import torch


def torch_openmp_library() -> str | None:
    """The path of the OpenMP runtime torch loaded (found through /proc/self/maps, so
    Linux only); None without one. Other wheels bring their own copy (sentencepiece's
    libgomp): torch's is the one in its package (torch/lib, or auditwheel's torch.libs
    beside it), else the first loaded."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = list(dict.fromkeys(re.findall(r"\S*/lib[gi]?omp[\w.-]*\.so[\w.]*", maps)))
    home = Path(torch.__file__).parent
    ours = [f for f in found if Path(f).parent in (home / "lib", home.with_name("torch.libs"))]
    return (ours or found or [None])[0]


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """omp_set_num_threads of torch's OpenMP runtime; None without one."""
    library = torch_openmp_library()
    return None if library is None else ctypes.CDLL(library).omp_set_num_threads


def run_torch_ops_single_threaded() -> None:
    """Make this thread's torch ops run on it alone, without an OpenMP team.

    Only this thread changes: the OpenMP setting is per thread, while torch.set_num_threads
    would also change the count every thread started later takes. Nothing to do (and
    nothing done) without an OpenMP runtime we can reach."""
    set_num_threads = _omp_set_num_threads()
    if set_num_threads is not None:
        torch.get_num_threads()  # torch's own per-thread set-up first: it would undo ours
        set_num_threads(1)

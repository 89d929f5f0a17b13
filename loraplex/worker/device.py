"""The engine's GPU as the calling thread's current device.

Triton launches, CUDA graph capture, CUDA events and pinned host allocations go to the
thread's current device, not to their tensors' one, and every thread starts on GPU 0.
So each thread that does GPU work for an engine on cuda:N makes cuda:N current first:
the engine at construction and at every step (the async engine steps on a thread of its
own), and the adapter loader's workers before they pin host memory.
"""

from __future__ import annotations

import torch


def use_device(device: torch.device) -> None:
    """Make `device` current on this thread; nothing to do for a CPU device."""
    if device.type == "cuda" and torch.cuda.current_device() != device.index:
        torch.cuda.set_device(device.index)

"""Every LORAPLEX_* environment variable, read in one place (vLLM's VLLM_* with a new prefix).

Values are read lazily on attribute access (``loraplex.envs.LORAPLEX_PLUGINS``), so tests
and launchers can set them after import, exactly as with ``vllm.envs``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_TRUE = ("1", "true", "yes", "on")


def _flag(name: str, default: bool = False) -> Callable[[], bool]:
    return lambda: os.getenv(name, str(default)).strip().lower() in _TRUE


def _list(name: str) -> Callable[[], list[str] | None]:
    def read() -> list[str] | None:
        raw = os.getenv(name)
        if raw is None:
            return None
        return [p.strip() for p in raw.split(",") if p.strip()]
    return read


def _float(name: str) -> Callable[[], float | None]:
    def read() -> float | None:
        raw = os.getenv(name)
        return float(raw) if raw not in (None, "") else None
    return read


environment_variables: dict[str, Callable[[], Any]] = {
    # Enables POST /v1/load_lora_adapter, /v1/unload_lora_adapter and resolver plugins.
    "LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": _flag("LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING"),
    # Comma list of plugin (entry point) names to load; unset = all installed plugins.
    "LORAPLEX_PLUGINS": _list("LORAPLEX_PLUGINS"),
    # Filesystem resolver: adapter `foo` is looked up as <dir>/foo.
    "LORAPLEX_LORA_RESOLVER_CACHE_DIR": lambda: os.getenv("LORAPLEX_LORA_RESOLVER_CACHE_DIR"),
    # HF hub resolver: repos whose sub-folders may be requested as `org/repo/subpath`.
    "LORAPLEX_LORA_RESOLVER_HF_REPO_LIST": _list("LORAPLEX_LORA_RESOLVER_HF_REPO_LIST"),
    # Where loraplex.assets keeps downloaded example media (vLLM's VLLM_ASSETS_CACHE);
    # unset: ~/.cache/loraplex/assets.
    "LORAPLEX_ASSETS_CACHE": lambda: os.getenv("LORAPLEX_ASSETS_CACHE"),
    # Same as --api-key (the flag wins).
    "LORAPLEX_API_KEY": lambda: os.getenv("LORAPLEX_API_KEY"),
    # KV cache size in GiB when running on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE).
    "LORAPLEX_CPU_KVCACHE_SPACE": _float("LORAPLEX_CPU_KVCACHE_SPACE"),
    # On the CPU, keep freed activation memory in the heap (glibc mallopt; see
    # worker/cpu_allocator.py); 0 leaves malloc as it is.
    "LORAPLEX_CPU_KEEP_FREED_MEMORY": _flag("LORAPLEX_CPU_KEEP_FREED_MEMORY", True),
    # Kernel backends: auto (Triton on CUDA when triton imports, torch otherwise), torch or
    # triton (on CPU tensors only under TRITON_INTERPRET=1: what the tests use).
    "LORAPLEX_LORA_BACKEND": lambda: os.getenv("LORAPLEX_LORA_BACKEND", "auto").strip().lower(),
    "LORAPLEX_ATTENTION_BACKEND":
        lambda: os.getenv("LORAPLEX_ATTENTION_BACKEND", "auto").strip().lower(),
    # GPTQ / AWQ base weights: the fused dequantize-matmul kernel, or torch's dequantize
    "LORAPLEX_QUANT_BACKEND": lambda: os.getenv("LORAPLEX_QUANT_BACKEND", "auto").strip().lower(),
    # Development routes (vLLM's VLLM_SERVER_DEV_MODE): POST /reset_prefix_cache.
    "LORAPLEX_SERVER_DEV_MODE": _flag("LORAPLEX_SERVER_DEV_MODE"),
    # /v1/responses: keep responses in memory (LRU of LORAPLEX_RESPONSES_API_STORE_SIZE) for
    # previous_response_id and GET /v1/responses/{id} (vLLM's VLLM_ENABLE_RESPONSES_API_STORE)
    "LORAPLEX_ENABLE_RESPONSES_API_STORE": _flag("LORAPLEX_ENABLE_RESPONSES_API_STORE"),
    "LORAPLEX_RESPONSES_API_STORE_SIZE":
        lambda: int(os.getenv("LORAPLEX_RESPONSES_API_STORE_SIZE", "1024")),
    # LoRAX's merged_adapters: the most merges the server keeps registered (and on disk);
    # past it the least recently used one is unloaded (requests on it finish first)
    "LORAPLEX_MAX_MERGED_ADAPTERS":
        lambda: int(os.getenv("LORAPLEX_MAX_MERGED_ADAPTERS", "64")),
    # Log level of the loraplex loggers.
    "LORAPLEX_LOGGING_LEVEL": lambda: os.getenv("LORAPLEX_LOGGING_LEVEL", "INFO").upper(),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)

"""Built-in LoRA resolvers: a local directory and Hugging Face hub repos.

Both are general plugins (see pyproject's ``loraplex.general_plugins``); each registers
itself only when its environment variable is set, so loading all plugins is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from loraplex import envs
from loraplex.lora.request import LoRARequest
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry

logger = logging.getLogger(__name__)


def _placeholder_id(lora_name: str) -> int:
    """Any id >= 1: the server replaces it with its own."""
    return abs(hash(lora_name)) or 1


def _is_lora_dir(path: Path) -> bool:
    cfg = path / "adapter_config.json"
    try:
        if not cfg.is_file():
            return False
    except OSError:  # a name too long for the filesystem, say: a miss
        return False
    try:
        peft_type = json.loads(cfg.read_text()).get("peft_type", "LORA")
    except (OSError, ValueError, AttributeError):
        return True  # let the loader report the broken config with its reason
    return str(peft_type).upper() == "LORA"


class FilesystemResolver(LoRAResolver):
    """Adapter ``name`` is ``<lora_cache_dir>/<name>`` when that dir holds a PEFT LoRA."""

    def __init__(self, lora_cache_dir: str) -> None:
        self.lora_cache_dir = Path(lora_cache_dir).resolve()

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        # the name is one entry of the dir: no "../x", "a/b" or "/etc". The entry itself may
        # be a symlink (a dir of links into a shared adapter store): the operator put it there
        if lora_name in ("", ".", "..") or any(
                sep in lora_name for sep in (os.sep, os.altsep, "/") if sep):
            return None
        path = self.lora_cache_dir / lora_name
        if not await asyncio.to_thread(_is_lora_dir, path):
            return None
        return LoRARequest(lora_name, _placeholder_id(lora_name), str(path),
                           base_model_name=base_model_name)


class HfHubResolver(LoRAResolver):
    """Adapter ``org/repo/subpath`` is downloaded from an allowed repo (not for production)."""

    def __init__(self, repo_list: list[str]) -> None:
        self.repo_list = repo_list

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        for repo in self.repo_list:
            if lora_name != repo and not lora_name.startswith(repo + "/"):
                continue
            sub = lora_name[len(repo):].strip("/")
            if ".." in sub.split("/"):
                return None
            try:
                from huggingface_hub import snapshot_download
                local = await asyncio.to_thread(
                    snapshot_download, repo_id=repo,
                    allow_patterns=[f"{sub}/*"] if sub else None)
            except Exception as e:  # offline, no such repo, auth: a miss, not a crash
                logger.warning("HF hub resolver: cannot download %s: %s", lora_name, e)
                return None
            path = Path(local) / sub
            if await asyncio.to_thread(_is_lora_dir, path):
                return LoRARequest(lora_name, _placeholder_id(lora_name), str(path),
                                   base_model_name=base_model_name)
        return None


def register_filesystem_resolver() -> None:
    cache_dir = envs.LORAPLEX_LORA_RESOLVER_CACHE_DIR
    if not cache_dir:
        return
    if not os.path.isdir(cache_dir):
        raise ValueError(f"LORAPLEX_LORA_RESOLVER_CACHE_DIR={cache_dir!r} is not a directory")
    LoRAResolverRegistry.register_resolver("lora_filesystem_resolver",
                                           FilesystemResolver(cache_dir))


def register_hf_hub_resolver() -> None:
    repos = envs.LORAPLEX_LORA_RESOLVER_HF_REPO_LIST
    if repos:
        LoRAResolverRegistry.register_resolver("lora_hf_hub_resolver", HfHubResolver(repos))

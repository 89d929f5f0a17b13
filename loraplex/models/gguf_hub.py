"""vLLM's hub names for a GGUF base: `repo_id:quant_type` and `repo_id/file.gguf`.

A GGUF repo holds one file per quantization (`Qwen3-0.6B-Q4_K_M.gguf`, `...-Q8_0.gguf`),
so `unsloth/Qwen3-0.6B-GGUF:Q4_K_M` names the one whose name carries that type, and only
it is downloaded; `repo_id/path/file.gguf` names a file outright. Both go through the hub
cache (so `HF_HUB_OFFLINE=1` finds a file fetched before).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

_QUANT_FORM = re.compile(r"^([\w.-]+/[\w.-]+):([\w.-]+)$")


@dataclass(frozen=True)
class HubGGUF:
    repo_id: str
    quant_type: str | None = None  # repo_id:quant_type
    filename: str | None = None  # repo_id/filename (a path inside the repo)

    def __str__(self) -> str:
        return (f"{self.repo_id}:{self.quant_type}" if self.quant_type
                else f"{self.repo_id}/{self.filename}")


def hub_gguf_name(model: str) -> HubGGUF | None:
    """`model` as one of the hub forms, or None. Call only for a path that does not exist
    locally: a local file always wins."""
    if m := _QUANT_FORM.match(model):
        return HubGGUF(m[1], quant_type=m[2])
    parts = model.split("/")
    if model.endswith(".gguf") and len(parts) >= 3 and not model.startswith((".", "/", "~")):
        return HubGGUF("/".join(parts[:2]), filename="/".join(parts[2:]))
    return None


def _of_type(filename: str, quant_type: str) -> bool:
    """The file's name carries the quant type as a word of its own (Q4_K_M, not IQ4_K_M)."""
    stem = os.path.basename(filename)[:-len(".gguf")]
    return re.search(rf"(^|[-_.]){re.escape(quant_type)}([-_.]|$)", stem, re.I) is not None


def download_gguf(name: HubGGUF, revision: str | None = None) -> str:
    """The local path of the file `name` means, fetched into the hub cache if need be."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if name.filename is not None:
            return hf_hub_download(name.repo_id, name.filename, revision=revision)
        q = name.quant_type or ""
        folder = snapshot_download(name.repo_id, revision=revision, allow_patterns=[
            f"*{v}*.gguf" for v in sorted({q, q.upper(), q.lower()})])
    except Exception as e:  # hub errors come in many types; the message says which
        raise ValueError(f"GGUF {name}: cannot fetch it from the Hugging Face hub: {e}") from e
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True)
                   if _of_type(f, q))
    if len(files) != 1:
        found = ", ".join(os.path.relpath(f, folder) for f in files) or "none"
        raise ValueError(f"GGUF {name}: {name.repo_id} must hold exactly one .gguf file of "
                         f"type {q} (found: {found}); name the file as {name.repo_id}/FILE.gguf")
    return files[0]

"""PEFT-format adapters written directly, and the base with one merged into its weights:
for layouts PEFT cannot make or run here (a module per expert, as transformers 4 and vLLM
hold them; LoRA on modules PEFT refuses or bypasses). The merged checkpoint (W + alpha / r
* B A) is then the reference, run by HF without PEFT."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def write_lora_adapter(out: Path, modules: Iterable[tuple[str, int, int]], r: int, seed: int,
                       target_modules: list[str], base: Path,
                       edit: dict[str, Any] | None = None) -> Path:
    """LoRA of rank r (alpha 2r) on each (HF module path, in features, out features), A and
    B drawn at std 0.3 in that order; `edit`: adapter_config.json fields over these."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, d_in, d_out in modules:
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(r, d_in, generator=gen)
        tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(d_out, r, generator=gen)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": target_modules, "base_model_name_or_path": str(base),
              **(edit or {})}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def merged_checkpoint(base: Path, adapter: Path, out: Path) -> Path:
    """The base with the adapter merged into its weights (W + lora_alpha / r * B A)."""
    shutil.copytree(base, out)
    weights = load_file(str(base / "model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            weights[f"{module}.weight"] += cfg["lora_alpha"] / cfg["r"] * b @ a
    save_file(weights, str(out / "model.safetensors"))
    return out


def fused_experts_checkpoint(base: Path, out: Path, leaves: tuple[str, str, str],
                             num_experts: int) -> Path:
    """The base with each layer's per-expert weights (experts.{e}.{leaf}.weight, as the hub
    ships them) fused as transformers 5 holds them: gate_up_proj [E, 2I, H] (the gate's
    rows, then the up projection's) and down_proj [E, H, I]; `leaves`: the checkpoint's
    names of gate, up and down."""
    shutil.copytree(base, out)
    tensors = load_file(str(base / "model.safetensors"))
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in {k.partition(".experts.")[0] for k in tensors if ".experts." in k}:
        gate, up, down = (torch.stack([tensors[f"{layer}.experts.{e}.{leaf}.weight"]
                                       for e in range(num_experts)]) for leaf in leaves)
        fused[f"{layer}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{layer}.experts.down_proj"] = down
    save_file(fused, str(out / "model.safetensors"))
    return out

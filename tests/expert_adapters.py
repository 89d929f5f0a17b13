"""Adapters written by hand on each expert of a checkpoint (per-expert modules, as
transformers 4, vLLM and the hub's checkpoints name them), checked against HF running the
base with their deltas merged: test_deepseek.py's and test_kimi_linear.py's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.engine_utils import GREEDY, check_against_hf, lora_requests, make_llm


def per_expert_adapter(base: Path, out: Path, ref: Path, experts: str = ".mlp.experts.",
                       leaves: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
                       r: int = 4, seed: int = 5) -> Path:
    """An adapter on every expert of `base` (its checkpoint's tensors under `experts`),
    saved per expert into `out`; `ref`: the base with its deltas merged."""
    weights = load_file(str(base / "model.safetensors"))
    lora = {}
    gen = torch.Generator().manual_seed(seed)
    for key, weight in weights.items():
        if experts not in key:
            continue
        module = key.removesuffix(".weight")
        a = 0.3 * torch.randn(r, weight.shape[1], generator=gen)
        b = 0.3 * torch.randn(weight.shape[0], r, generator=gen)
        lora[f"base_model.model.{module}.lora_A.weight"] = a
        lora[f"base_model.model.{module}.lora_B.weight"] = b
        weights[key] = weight + b @ a * 2.0  # alpha / r
    assert lora, "no per-expert weights in the checkpoint"
    shutil.copytree(base, ref)
    save_file(weights, str(ref / "model.safetensors"), metadata={"format": "pt"})
    out.mkdir()
    save_file(lora, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
        "target_modules": list(leaves)}))
    return out


def check_merged_adapter(base: Path, ref: Path, adapter: Path, other: tuple[str, Path],
                         prompts: list[list[int]]) -> None:
    """`adapter` beside the base and `other` (a PEFT adapter) over one slot: its rows as
    HF computes `ref` (the merged base), the others as HF + PEFT."""
    name, other_dir = other
    reqs = lora_requests({"merged": adapter, name: other_dir})
    batch = [(None, prompts[0]), ("merged", prompts[0]), (name, prompts[1]),
             ("merged", prompts[2])]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    outs = llm.generate([{"prompt_token_ids": p} for _, p in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for n, _ in batch],
                        use_tqdm=False)
    for out, (n, prompt) in zip(outs, batch, strict=True):
        ref_base, ref_adapter = (ref, None) if n == "merged" else \
            (base, other_dir if n else None)
        check_against_hf([out], ref_base, [ref_adapter], [prompt])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids

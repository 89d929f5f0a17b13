"""compressed-tensors FP8-activation and NVFP4 checkpoints of the tiny test models,
written by the compressed-tensors package itself, as llm-compressor writes them: one of
its preset schemes (FP8_DYNAMIC, FP8, FP8_BLOCK, NVFP4A16, NVFP4) applied to every
Linear but lm_head, min-max scales from its own calculate_qparams / generate_gparam
(NVFP4's weight global scales shared by q/k/v and by gate/up, as llm-compressor fuses
them), static activation ranges calibrated on a few prompts, then its ModelCompressor
compresses and saves.

The reference is the same model saved "frozen" (its unquantized weights, the scales and
the scheme): transformers runs it through the package's own forward, which fake-quantizes
each Linear's weight and input as the scheme says, in fp32. (transformers loads the
compressed FP8 checkpoints themselves to the same model; its NVFP4 decompression makes
bf16 weights, which an fp32 model cannot run.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.quantized_fixtures import _package_start

FORMATS = {"FP8_DYNAMIC": "float-quantized", "FP8": "float-quantized",
           "FP8_BLOCK": "float-quantized", "NVFP4A16": "nvfp4-pack-quantized",
           "NVFP4": "nvfp4-pack-quantized"}
# the projections that read one input, whose NVFP4 global scales llm-compressor fuses
_FUSED = (re.compile(r"\.(q|k|v)_proj$"), re.compile(r"\.(gate|up)_proj$"))


def _inputs(model: Any, linears: dict[str, torch.nn.Module],
            calibration: list[list[int]]) -> dict[str, torch.Tensor]:
    """Each Linear's inputs over the calibration prompts, unquantized: [tokens, in]."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(
        lambda _, args, n=n: seen[n].append(args[0].detach().flatten(0, -2).clone()))
        for n, m in linears.items()]
    with torch.no_grad():
        for ids in calibration:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _fused_min(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each q/k/v (gate/up) its group's smallest global scale, as llm-compressor's
    update_fused_layer_weight_global_scales."""
    out = dict(values)
    for pattern in _FUSED:
        sites: dict[str, list[str]] = {}
        for n in values:
            if pattern.search(n):
                sites.setdefault(pattern.sub("", n), []).append(n)
        for names in sites.values():
            low = torch.stack([values[n] for n in names]).min(0).values
            out.update({n: low for n in names})
    return out


def _weight_scales(m: torch.nn.Module, args: Any, global_scale: torch.Tensor | None) -> None:
    from compressed_tensors.quantization.utils import calculate_qparams

    w = m.weight.data
    if args.strategy == "block":
        bo, bi = args.block_structure
        g = w.view(w.shape[0] // bo, bo, w.shape[1] // bi, bi)
        lo, hi = g.amin((1, 3)), g.amax((1, 3))
    elif args.strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:  # channel, or groups of the inputs (NVFP4's tensor_group)
        size = w.shape[1] if args.strategy == "channel" else args.group_size
        g = w.view(w.shape[0], -1, size)
        lo, hi = g.amin(-1), g.amax(-1)
    scale, _ = calculate_qparams(lo, hi, args, global_scale=global_scale)
    m.weight_scale.data.copy_(scale.view_as(m.weight_scale))


def write_ct_float(base_dir: Path, out_root: Path, scheme: str,
                   calibration: list[list[int]], block: tuple[int, int] = (16, 32)
                   ) -> tuple[Path, Path]:
    """(checkpoint, frozen reference) of preset `scheme` (FORMATS' keys); FP8_BLOCK's
    128 x 128 weight blocks and activation groups of 128 are `block` and block[1] here,
    to fit the tiny models."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model, _, quant_dir, ref_dir = _package_start(base_dir, out_root, scheme.lower(), 8, -1,
                                                  True)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    inputs = _inputs(model, linears, calibration)
    preset = preset_name_to_scheme(scheme, ["Linear"])
    if scheme == "FP8_BLOCK":
        preset.weights.block_structure = list(block)
        preset.input_activations.group_size = block[1]
    config = QuantizationConfig(config_groups={"group_0": preset}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    args = config.config_groups["group_0"]
    nvfp4 = args.weights.num_bits == 4
    globals_ = _fused_min({n: generate_gparam(m.weight.amin(), m.weight.amax())
                           for n, m in linears.items()}) if nvfp4 else {}
    for n, m in linears.items():
        if nvfp4:
            m.weight_global_scale.data.copy_(globals_[n])
        _weight_scales(m, args.weights, globals_.get(n))
        acts, x = args.input_activations, inputs[n]
        if acts is not None and acts.dynamic is False:  # FP8's static input_scale
            scale, _ = calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), acts)
            m.input_scale.data.copy_(scale.view_as(m.input_scale))
        elif acts is not None and acts.dynamic == "local":  # NVFP4's input_global_scale
            m.input_global_scale.data.copy_(generate_gparam(x.amin(), x.amax()))
    _save_frozen(model, config, ref_dir)
    compressor = ModelCompressor.from_pretrained_model(model,
                                                       quantization_format=FORMATS[scheme])
    compressor.compress_model(model)
    model.save_pretrained(str(quant_dir))
    compressor.update_config(str(quant_dir))
    return quant_dir, ref_dir


def _save_frozen(model: Any, config: Any, ref_dir: Path) -> None:
    ref = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    frozen = config.model_dump()
    frozen.update(quant_method="compressed-tensors", format="dense",
                  quantization_status="frozen")
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg["quantization_config"] = frozen
    (ref_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))

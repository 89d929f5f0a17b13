"""GPTQ and AWQ checkpoints of the tiny test models, written the way their quantizers do.

Packing follows AutoGPTQ's `QuantLinear.pack` (values along the inputs, zeros stored
minus one in the original "gptq" format) and AutoAWQ's `WQLinear_GEMM.from_linear`
(values along the outputs in the interleaved order 0 2 4 6 1 3 5 7). The integer weights
and the reference weights come from the same numbers before any packing, so a loader that
unpacks wrongly cannot agree with the reference by construction.

Each call writes two HF directories: the quantized checkpoint, and the same model with
the dequantized weights in fp32, which HF transformers + PEFT run as the reference. A
mixture of experts' experts are quantized one linear each (Mixtral's w1 / w2 / w3, Qwen's
gate_proj / up_proj / down_proj), as GPTQ and AWQ checkpoints of them store them; the
routers (`gate`, `shared_expert_gate`) stay plain, as their quantizers leave them, unless
`router=True` (GPTQModel's / AutoRound's Qwen3-MoE checkpoints quantize `mlp.gate`).
bitsandbytes 4-bit checkpoints (write_bnb4) come from bitsandbytes' own quantize_4bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_LINEAR = re.compile(r"\.((q|k|v|o|gate|up|down)_proj|experts\.\d+\.w[123])\.weight$")
_ROUTER = re.compile(r"\.gate\.weight$")  # a mixture's router (not shared_expert_gate)
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k holds column AWQ_PACK_ORDER[k]


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ: qweight[r] |= q[r * per + j] << (bits * j)."""
    per = 32 // bits
    q = q.to(torch.int64).view(q.shape[0] // per, per, *q.shape[1:])
    out = torch.zeros(q.shape[0], *q.shape[2:], dtype=torch.int64)
    for j in range(per):
        out |= q[:, j] << (bits * j)
    return _to_int32(out)


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Values along the last axis; nibble k of column c holds q[:, c * per + order[k]]."""
    per = 32 // bits
    order = order or tuple(range(per))
    q = q.to(torch.int64).view(q.shape[0], -1, per)
    out = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int64)
    for k in range(per):
        out |= q[:, :, order[k]] << (bits * k)
    return _to_int32(out)


def _scales_zeros(w_in_out: torch.Tensor, groups: torch.Tensor, num_groups: int, bits: int,
                  sym: bool, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min-max quantization parameters: fp16 scales, integer zeros."""
    maxq = 2**bits - 1
    scales = torch.empty(num_groups, w_in_out.shape[1])
    zeros = torch.empty(num_groups, w_in_out.shape[1], dtype=torch.int64)
    for g in range(num_groups):
        rows = w_in_out[groups == g]
        if sym:
            scales[g] = rows.abs().amax(0).clamp_min(1e-5) / ((maxq + 1) // 2 - 1)
            zeros[g] = (maxq + 1) // 2
        else:
            lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            scales[g] = ((hi - lo) / maxq).clamp_min(1e-5)
            zeros[g] = torch.round(-lo / scales[g]).clamp(min_zero, maxq).to(torch.int64)
    return scales.half(), zeros


def quantize_gptq(w: torch.Tensor, *, bits: int = 4, group_size: int = 32, sym: bool = False,
                  desc_act: bool = False, fmt: str = "gptq", seed: int = 0
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One HF weight [out, in] -> (qweight, qzeros, scales, g_idx), dequantized [out, in]."""
    n_in = w.shape[1]
    gs = n_in if group_size == -1 else group_size
    num_groups = n_in // gs
    if desc_act:  # act-order: groups follow a permutation of the inputs
        perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(n_in, dtype=torch.int64)
        g_idx[perm] = torch.arange(n_in) // gs
    else:
        g_idx = torch.arange(n_in) // gs
    w_t = w.t().float()  # [in, out]
    # the original format stores zero - 1, so a zero of 0 would wrap: real quantizers
    # have that bug, the fixture avoids it
    scales, zeros = _scales_zeros(w_t, g_idx, num_groups, bits, sym,
                                  min_zero=1 if fmt == "gptq" else 0)
    s, z = scales.float()[g_idx], zeros[g_idx]
    q = torch.clamp(torch.round(w_t / s) + z, 0, 2**bits - 1).to(torch.int64)
    deq = ((q - z).float() * s).t().contiguous()
    stored_zeros = zeros - (1 if fmt == "gptq" else 0)
    tensors = {"qweight": pack_rows(q, bits), "qzeros": pack_cols(stored_zeros, bits),
               "scales": scales, "g_idx": g_idx.to(torch.int32)}
    return tensors, deq


def quantize_awq(w: torch.Tensor, *, group_size: int = 32, seed: int = 0
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One HF weight [out, in] -> AWQ GEMM (qweight, qzeros, scales), dequantized [out, in]."""
    n_in = w.shape[1]
    groups = torch.arange(n_in) // group_size
    w_t = w.t().float()
    scales, zeros = _scales_zeros(w_t, groups, n_in // group_size, 4, sym=False, min_zero=0)
    s, z = scales.float()[groups], zeros[groups]
    q = torch.clamp(torch.round(w_t / s) + z, 0, 15).to(torch.int64)
    deq = ((q - z).float() * s).t().contiguous()
    tensors = {"qweight": pack_cols(q, 4, AWQ_PACK_ORDER),
               "qzeros": pack_cols(zeros, 4, AWQ_PACK_ORDER), "scales": scales}
    return tensors, deq


def _weights_and_two_copies(base_dir: Path, quant_dir: Path, ref_dir: Path
                            ) -> dict[str, torch.Tensor]:
    """The base's weights; quant_dir and ref_dir made copies of it without them (config,
    tokenizer), for the quantized and the reference weights."""
    for d in (quant_dir, ref_dir):
        shutil.copytree(base_dir, d)
        for f in d.glob("*.safetensors*"):
            f.unlink()
    state: dict[str, torch.Tensor] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def write_quantized(base_dir: Path, out_root: Path, method: str, *, bits: int = 4,
                    group_size: int = 32, sym: bool = False, desc_act: bool = False,
                    fmt: str = "gptq", skip: tuple[str, ...] = (), router: bool = False,
                    linears: re.Pattern[str] = _LINEAR) -> tuple[Path, Path]:
    """(quantized checkpoint, dequantized fp32 reference) of a tiny safetensors model;
    `router`: the mixture's routers quantized too; `linears`: the weights to quantize (a
    hybrid model's own projections too)."""
    quant_dir, ref_dir = out_root / f"{method}_quant", out_root / f"{method}_ref"
    state = _weights_and_two_copies(base_dir, quant_dir, ref_dir)
    quant, ref = {}, {}
    sites: dict[str, int] = {}  # act-order permutations follow the input: q/k/v share one
    for name, w in sorted(state.items()):
        quantized = linears.search(name) or (router and _ROUTER.search(name))
        if not quantized or any(s in name for s in skip):
            quant[name] = ref[name] = w
            continue
        prefix = name[:-len(".weight")]
        # (an expert's gate and up: Mixtral's w1 and w3)
        site = re.sub(r"\.(q|k|v)_proj$", ".qkv",
                      re.sub(r"\.(gate_proj|up_proj|w1|w3)$", ".gate_up", prefix))
        i = sites.setdefault(site, len(sites))
        if method == "gptq":
            tensors, deq = quantize_gptq(w, bits=bits, group_size=group_size, sym=sym,
                                         desc_act=desc_act, fmt=fmt, seed=i)
        else:
            tensors, deq = quantize_awq(w, group_size=group_size, seed=i)
        quant.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        ref[name] = deq.to(w.dtype)
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quant_dir / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size,
              "zero_point": True, "version": "gemm"}
    if skip:
        qc["modules_to_not_convert"] = list(skip)
    cfg["quantization_config"] = qc
    (quant_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return quant_dir, ref_dir


def write_bnb4(base_dir: Path, out_root: Path, name: str, *, prequantized: bool,
               quant_type: str = "nf4", double_quant: bool = False,
               linears: re.Pattern[str] = _LINEAR) -> tuple[Path, Path]:
    """(checkpoint, fp32 reference) for a bitsandbytes 4-bit base, every linear through
    bitsandbytes' quantize_4bit / dequantize_4bit (blocks of 64). prequantized: the
    checkpoint transformers 4's load_in_4bit saves (a Params4bit per linear, each expert's
    and the routers' too: `weight` and its quant state); else the plain base itself, for
    quantization="bitsandbytes", whose routers stay plain. `linears`: the weights
    quantized."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    quant_dir, ref_dir = out_root / f"{name}_quant", out_root / f"{name}_ref"
    state = _weights_and_two_copies(base_dir, quant_dir, ref_dir)
    quant, ref = {}, {}
    for key, w in sorted(state.items()):
        routers = prequantized and re.search(r"\.(gate|shared_expert_gate)\.weight$", key)
        if not (linears.search(key) or routers):
            quant[key] = ref[key] = w
            continue
        # bitsandbytes 0.47 and 0.48 (0.50 does not) crash on the CPU double-quantizing one
        # 64-block tensor (the tiny Qwen2-MoE's shared_expert_gate, [1, 64]; real ones have
        # thousands): that one is written single-quantized, which the loader reads per tensor
        q, qs = quantize_4bit(w.float(), blocksize=64, quant_type=quant_type,
                              compress_statistics=double_quant and w.numel() > 64)
        ref[key] = dequantize_4bit(q, qs).to(w.dtype)
        quant.update({key: q, **{f"{key}.{k}": v for k, v in qs.as_dict(packed=True).items()}}
                     if prequantized else {key: w})
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    if prequantized:
        cfg = json.loads((quant_dir / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": None}
        (quant_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return quant_dir, ref_dir


def quantize_fp8(w: torch.Tensor, strategy: str, block: tuple[int, int] = (16, 16)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8 values, scale, dequantized fp32) of a weight [out, in]: one scale for the tensor,
    one per output row ([out, 1]), or one per block of `block` ([ceil(out/bo), ceil(in/bi)],
    partial blocks at the edges), each the block's absmax / 448."""
    fp8, top = torch.float8_e4m3fn, torch.finfo(torch.float8_e4m3fn).max
    w = w.float()
    if strategy == "tensor":
        scale = w.abs().max().reshape(1) / top
        full = scale.expand_as(w)
    elif strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / top
        full = scale.expand_as(w)
    else:
        bo, bi = block
        rows, cols = -(-w.shape[0] // bo), -(-w.shape[1] // bi)
        scale = torch.empty(rows, cols)
        for r in range(rows):
            for c in range(cols):
                scale[r, c] = w[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi].abs().max() / top
        full = scale.repeat_interleave(bo, 0)[:w.shape[0]].repeat_interleave(bi, 1)[:, :w.shape[1]]
    q = (w / full).clamp(-top, top).to(fp8)
    return q, scale, q.float() * full


def write_fp8(base_dir: Path, out_root: Path, fmt: str, strategy: str, *,
              block: tuple[int, int] = (16, 16), skip: tuple[str, ...] = (),
              static_inputs: bool = False, linears: re.Pattern[str] = _LINEAR
              ) -> tuple[Path, Path]:
    """(FP8 checkpoint, dequantized fp32 reference) of a tiny safetensors model, in the
    `fp8` format (Qwen / DeepSeek / transformers: weight_scale_inv for blocks, else
    weight_scale; `static_inputs`: activation_scheme static, with transformers'
    activation_scale) or llm-compressor's `compressed-tensors`, weight-only (weight_scale;
    `skip` are its `ignore` entries, exact names or "re:" regexes; with FP8 activations:
    tests/ct_float_fixtures.py). `linears`: the weights quantized."""
    name = f"{fmt}_{strategy}"
    quant_dir, ref_dir = out_root / f"{name}_quant", out_root / f"{name}_ref"
    state = _weights_and_two_copies(base_dir, quant_dir, ref_dir)

    def skipped(module: str) -> bool:
        return any(re.match(s[3:], module) if s.startswith("re:") else s == module
                   for s in skip)
    quant, ref = {}, {}
    for key, w in sorted(state.items()):
        prefix = key[:-len(".weight")]
        if not linears.search(key) or skipped(prefix):
            quant[key] = ref[key] = w
            continue
        q, scale, deq = quantize_fp8(w, strategy, block)
        scale_name = "weight_scale_inv" if fmt == "fp8" and strategy == "block" else \
            "weight_scale"
        quant.update({key: q, f"{prefix}.{scale_name}": scale})
        if static_inputs:  # transformers' name for them
            quant[f"{prefix}.activation_scale"] = torch.tensor(0.01)
        ref[key] = deq.to(w.dtype)
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quant_dir / "config.json").read_text())
    if fmt == "fp8":
        qc: dict = {"quant_method": "fp8", "fmt": "e4m3",
                    "activation_scheme": "static" if static_inputs else "dynamic"}
        if strategy == "block":
            qc["weight_block_size"] = list(block)
        if skip:
            qc["modules_to_not_convert"] = list(skip)
    else:
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                   "dynamic": False}
        if strategy == "block":
            weights["block_structure"] = list(block)
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                            "input_activations": None}},
              "ignore": ["lm_head", *skip]}
    cfg["quantization_config"] = qc
    (quant_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return quant_dir, ref_dir


def quantize_ct_int(w: torch.Tensor, *, bits: int = 4, group_size: int = 32,
                    sym: bool = True, actorder: bool = False, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """compressed-tensors' int quantization of a weight [out, in], min-max per output row
    and group (group_size -1: per channel): (q signed [out, in], scale [out, groups],
    zero point signed [out, groups], g_idx [in], dequantized [out, in]), with
    W = (q - z[:, g]) * s[:, g]. Act-order: the groups follow a permutation of the inputs."""
    n_in = w.shape[1]
    gs = n_in if group_size == -1 else group_size
    if actorder:
        perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(n_in, dtype=torch.int64)
        g_idx[perm] = torch.arange(n_in) // gs
    else:
        g_idx = torch.arange(n_in) // gs
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    groups = n_in // gs
    w = w.float()
    lo = torch.stack([w[:, g_idx == g].amin(1) for g in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == g].amax(1) for g in range(groups)], 1).clamp(min=0)
    if sym:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(1e-5)
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-5)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int64)
    scale = scale.half().float()  # what the checkpoint stores (fp16)
    s, z = scale[:, g_idx], zero[:, g_idx]
    q = torch.clamp(torch.round(w / s) + z, qmin, qmax).to(torch.int64)
    return q, scale, zero, g_idx, (q - z).float() * s


def write_compressed_tensors(base_dir: Path, out_root: Path, name: str, *, bits: int = 4,
                             group_size: int = 32, sym: bool = True, actorder: bool = False,
                             fmt: str = "pack-quantized", ignore: tuple[str, ...] = (),
                             linears: re.Pattern[str] = _LINEAR) -> tuple[Path, Path]:
    """(compressed-tensors int checkpoint, dequantized fp32 reference) of a tiny model,
    packed as its pack_to_int32 does (signed values + 2^(bits-1), along the inputs, lowest
    bits first; zero points along the outputs) or, for naive-quantized, int8 as they are.
    `ignore`: exact module names (lm_head is always left out); `linears`: the weights
    quantized."""
    quant_dir, ref_dir = out_root / f"{name}_quant", out_root / f"{name}_ref"
    state = _weights_and_two_copies(base_dir, quant_dir, ref_dir)
    offset = 2 ** (bits - 1)
    quant, ref, sites = {}, {}, {}
    for key, w in sorted(state.items()):
        prefix = key[:-len(".weight")]
        if not linears.search(key) or prefix in ignore:
            quant[key] = ref[key] = w
            continue
        site = re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", prefix))
        q, scale, zero, g_idx, deq = quantize_ct_int(
            w, bits=bits, group_size=group_size, sym=sym, actorder=actorder,
            seed=sites.setdefault(site, len(sites)))
        tensors = {"weight_scale": scale.half()}
        if fmt == "pack-quantized":
            tensors |= {"weight_packed": pack_cols(q + offset, bits),
                        "weight_shape": torch.tensor(list(w.shape))}
            if not sym:
                tensors["weight_zero_point"] = pack_rows(zero + offset, bits)
        else:
            tensors["weight"] = q.to(torch.int8)
            if not sym:
                tensors["weight_zero_point"] = zero.to(torch.int8)
        if actorder:
            tensors["weight_g_idx"] = g_idx.to(torch.int32)
        quant.update({f"{prefix}.{k}": v for k, v in tensors.items()})
        ref[key] = deq.to(w.dtype)
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size,
               "actorder": "group" if actorder else None, "observer": "minmax"}
    cfg = json.loads((quant_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": ["lm_head", *ignore], "kv_cache_scheme": None, "sparsity_config": {},
        "transform_config": {}}
    (quant_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return quant_dir, ref_dir


def _package_start(base_dir: Path, out_root: Path, name: str, bits: int, group_size: int,
                   sym: bool) -> tuple[Any, Any, Path, Path]:
    """What both package writers start from: (the base as an HF model, the weights' int
    QuantizationArgs, checkpoint dir, reference dir)."""
    from compressed_tensors.quantization import QuantizationArgs
    from transformers import AutoModelForCausalLM

    quant_dir, ref_dir = out_root / f"{name}_quant", out_root / f"{name}_ref"
    _weights_and_two_copies(base_dir, quant_dir, ref_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                            strategy="channel" if group_size == -1 else "group",
                            group_size=None if group_size == -1 else group_size)
    return model, args, quant_dir, ref_dir


def write_with_compressed_tensors(base_dir: Path, out_root: Path, name: str, *, bits: int = 4,
                                  group_size: int = 32, sym: bool = True,
                                  ignore: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The same kind of checkpoint written by the compressed-tensors package itself (min-max
    scales from its calculate_qparams; its ModelCompressor packs and saves, as
    llm-compressor does), and the reference its own decompress_model makes of it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model, args, quant_dir, ref_dir = _package_start(base_dir, out_root, name, bits,
                                                     group_size, sym)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head", *ignore]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            g = w.view(w.shape[0], -1, w.shape[1] if group_size == -1 else group_size)
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
            module.weight_scale.data.copy_(scale.view_as(module.weight_scale))
            if not sym:
                module.weight_zero_point.data.copy_(zero.view_as(module.weight_zero_point))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(quant_dir))
    compressor.update_config(str(quant_dir))
    compressor.decompress_model(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()  # weights, not qparams
           if not re.search(r"\.weight_\w+$", k)}
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    return quant_dir, ref_dir


def write_ct_w8a8(base_dir: Path, out_root: Path, name: str, *, static: bool = False,
                  sym: bool = True, calibration: list[list[int]] | None = None,
                  weight_bits: int = 8, group_size: int = -1) -> tuple[Path, Path]:
    """(W8A8 checkpoint, reference) written by the compressed-tensors package: int8 weights
    per channel (min-max; or `weight_bits` per `group_size` inputs: W4A8, packed), int8
    activations dynamic per token, or static per tensor
    (`sym` or with a zero point) calibrated on `calibration`'s inputs (min-max). The
    reference is the same model saved "frozen" (dequantized weights, the scales and the
    scheme): transformers runs it through the package's own forward, which quantizes each
    Linear's input as the scheme says."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model, weights, quant_dir, ref_dir = _package_start(base_dir, out_root, name, weight_bits,
                                                        group_size, True)
    acts = (QuantizationArgs(num_bits=8, type="int", symmetric=sym, strategy="tensor",
                             dynamic=False) if static else
            QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                             dynamic=True))
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    if static:  # each Linear's input range over the calibration prompts, unquantized
        hooks = [m.register_forward_pre_hook(
            lambda _, args, n=n: seen[n].append(args[0].detach().clone()))
            for n, m in linears.items()]
        with torch.no_grad():
            for ids in calibration or [[1, 5, 9, 33, 70, 12, 3, 4]]:
                model(torch.tensor([ids]))
        for h in hooks:
            h.remove()
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=acts)}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for n, m in linears.items():
        w = m.weight.data
        g = w.view(w.shape[0], -1, w.shape[1] if group_size == -1 else group_size)
        scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), weights)
        m.weight_scale.data.copy_(scale)
        q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -2 ** (weight_bits - 1),
                        2 ** (weight_bits - 1) - 1)
        m.weight.data.copy_((q * scale.unsqueeze(-1)).view_as(w))
        if static:
            x = torch.cat([t.flatten(0, -2) for t in seen[n]])
            scale, zero = calculate_qparams(x.amin().reshape(1), x.amax().reshape(1), acts)
            m.input_scale.data.copy_(scale.view_as(m.input_scale))
            if not sym:
                m.input_zero_point.data.copy_(zero.view_as(m.input_zero_point))
    ref = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(ref, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    frozen = config.model_dump()
    frozen.update(quant_method="compressed-tensors", format="dense",
                  quantization_status="frozen")
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg["quantization_config"] = frozen
    (ref_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format="int-quantized" if weight_bits == 8 else "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(quant_dir))
    compressor.update_config(str(quant_dir))
    return quant_dir, ref_dir

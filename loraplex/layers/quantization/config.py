"""Which quantized checkpoints load: config.json's `quantization_config` -> QuantConfig.

GPTQ (AutoGPTQ / GPTQModel, 2/4/8 bits, any group size, act-order, symmetric or not,
checkpoint formats `gptq` and `gptq_v2`), AWQ (AutoAWQ's GEMM layout, 4 bits),
bitsandbytes (transformers' 4-bit NF4/FP4, double-quantized or not, and 8-bit LLM.int8
checkpoints) and FP8 (`fp8`: Qwen / DeepSeek / transformers, per tensor or per block;
`compressed-tensors`: llm-compressor's FP8 float-quantized, per tensor, channel or block,
weight-only or with FP8 activations; its NVFP4, nvfp4-pack-quantized, with or without
NVFP4 activations; and its int ones, W4A16 / W8A16: pack-quantized, naive- or
int-quantized, per channel or group, symmetric or not, act-order; W8A8 with int8
activations, dynamic per token or static per tensor) keep their quantized weights in memory, and so does MXFP4 (`mxfp4`: gpt-oss's
experts; its other weights are plain), and so do a GGUF file's Q8_0 / Q4_0 matrices, as
GPTQ with fp16 scales (models/gguf_quant.py marks them); anything else is refused with
what was found.
`quantization=` (vLLM's flag) may name the checkpoint's method; on a plain checkpoint
`bitsandbytes` and `fp8` apply, as in vLLM: its weights are quantized while they load (to
4-bit NF4, the base QLoRA adapters are trained on; to FP8 with a scale per row).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from loraplex.layers.quantization.float_activations import FloatActivationQuant
from loraplex.layers.quantization.int8_activations import ActivationQuant

SUPPORTED_METHODS = ("gptq", "awq", "bitsandbytes", "fp8", "compressed-tensors", "mxfp4")
BNB_BLOCKSIZE = 64  # bitsandbytes' 4-bit block: inputs per absmax (transformers' default)
# vLLM's names for the same checkpoints with other kernels: the same weights here
_ALIASES = {"gptq_marlin": "gptq", "marlin": "gptq", "awq_marlin": "awq"}


@dataclass(frozen=True)
class QuantConfig:
    # "gptq" | "awq" | "bitsandbytes" | "fp8" (compressed-tensors' FP8 too) | "mxfp4" |
    # "compressed-tensors" (its int weights) | "nvfp4" (compressed-tensors' NVFP4)
    method: str
    bits: int
    # inputs per scale/zero group (bitsandbytes 4-bit: per absmax block); -1 = the whole row
    group_size: int
    # GPTQ's original format stores zero - 1 (dequant adds it back); gptq_v2 and AWQ do not
    zero_offset: int = 0
    desc_act: bool = False  # GPTQ act-order: groups follow g_idx, not the input order
    modules_to_not_convert: tuple[str, ...] = ()
    quant_type: str = ""  # bitsandbytes 4-bit: "nf4" | "fp4"
    prequantized: bool = True  # False: a plain checkpoint, quantized as it loads
    fp8_block: tuple[int, int] | None = None  # fp8 per-block scales: (outputs, inputs)
    # compressed-tensors' symmetric int weights store no zero point: it is 2^(bits - 1)
    implicit_zero: bool = False
    # compressed-tensors' int8 activations (W8A8; int weights) or FP8 / NVFP4 ones (FP8 /
    # NVFP4 weights): each Linear's input is quantized too
    input_activations: ActivationQuant | FloatActivationQuant | None = None
    # GGUF's Q8_0 / Q4_0 as GPTQ (models/gguf_quant.py): the scales stay the file's fp16
    # (exact) instead of the model dtype's
    fp16_scales: bool = False

    @property
    def pack_factor(self) -> int:
        """Values per int32."""
        return 32 // self.bits

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def skips(self, module_name: str) -> bool:
        """Is this HF module (model.layers.0.mlp.down_proj) left unquantized? Substring
        match, as transformers and vLLM read modules_to_not_convert; "re:" entries are
        regexes from the start of the name (compressed-tensors' `ignore`)."""
        return any(re.match(m[3:], module_name) if m.startswith("re:") else m in module_name
                   for m in self.modules_to_not_convert)

    def renamed(self, renames: tuple[tuple[str, str], ...]) -> QuantConfig:
        """This config with its not-convert names under our module names: `renames` are a
        checkpoint's (LlamaArgs.checkpoint_renames: Mamba's `backbone.` is our `model.`),
        applied as the loader applies them to tensor names (in a regex, escaped too)."""
        def rename(entry: str) -> str:
            for theirs, ours in renames:
                entry = entry.replace(theirs, ours)
                if entry.startswith("re:"):
                    entry = entry.replace(re.escape(theirs), re.escape(ours))
            return entry
        return replace(self, modules_to_not_convert=tuple(
            rename(m) for m in self.modules_to_not_convert))


# older quantizers wrote their settings beside config.json instead of into it
_SIDE_FILES = (("quantize_config.json", "gptq"), ("quant_config.json", "awq"))


def read_side_config(hf_config: Any, path: str) -> None:
    """AutoGPTQ's quantize_config.json / AutoAWQ's quant_config.json, when config.json has
    no quantization_config: set as if it had (what vLLM reads too)."""
    if getattr(hf_config, "quantization_config", None):
        return
    for name, method in _SIDE_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                raw = json.load(f)
            raw.setdefault("quant_method", method)
            hf_config.quantization_config = raw
            return


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def quant_config_from_hf(hf_config: Any, requested: str | None = None) -> QuantConfig | None:
    """The checkpoint's quantization, checked against what this engine can run."""
    raw = getattr(hf_config, "quantization_config", None)
    requested = _ALIASES.get(requested, requested) if requested else None
    if requested and requested not in SUPPORTED_METHODS:
        raise ValueError(f"quantization={requested!r} is not supported yet: loraplex loads "
                         f"{', '.join(SUPPORTED_METHODS)} checkpoints")
    if not raw:
        if requested == "bitsandbytes":  # vLLM's in-flight 4-bit quantization
            return QuantConfig("bitsandbytes", 4, BNB_BLOCKSIZE, quant_type="nf4",
                               prequantized=False)
        if requested == "fp8":  # vLLM's in-flight FP8 (here a scale per row)
            return QuantConfig("fp8", 8, -1, prequantized=False)
        if requested:
            raise ValueError(f"quantization={requested!r}, but the checkpoint's config.json has "
                             "no quantization_config: it is not a quantized checkpoint")
        return None
    method = str(_get(raw, "quant_method", "") or type(raw).__name__).lower()
    if method == "gguf" and _get(raw, "gptq_layout", False):  # models/gguf_loader.py's
        # (a config.json's quant_method gguf is refused below)
        if requested:
            raise ValueError(f"quantization={requested!r} on a GGUF file whose Q8_0 / Q4_0 "
                             "matrices stay quantized: leave it unset (or 'gguf'), or "
                             "dequantize them first with hf_overrides "
                             "{\"quantization_config\": null}")
        return QuantConfig("gptq", int(raw["bits"]), int(raw["group_size"]),
                           modules_to_not_convert=tuple(raw["modules_to_not_convert"]),
                           fp16_scales=True)
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"quantized checkpoint (config.json quantization_config, quant_method="
                         f"{method!r}) is not supported yet: loraplex loads "
                         f"{', '.join(SUPPORTED_METHODS)} checkpoints")
    if requested and requested != method:
        raise ValueError(f"quantization={requested!r}, but the checkpoint is quantized with "
                         f"{method!r}: leave quantization unset or pass {method!r}")
    bits = int(_get(raw, "bits", _get(raw, "w_bit", 4)))
    group_size = int(_get(raw, "group_size", _get(raw, "q_group_size", 128)))
    skip = tuple(_get(raw, "modules_to_not_convert", None) or ())
    if method == "fp8":
        return _fp8(raw)
    if method == "mxfp4":  # 4-bit values, a power-of-two scale per 32 inputs
        return QuantConfig("mxfp4", 4, 32, modules_to_not_convert=skip)
    if method == "compressed-tensors":
        return _compressed_tensors(raw)
    if method == "gptq":
        return _gptq(raw, bits, group_size, skip)
    if method == "bitsandbytes":
        return _bitsandbytes(raw)
    return _awq(raw, bits, group_size, skip)


def _gptq(raw: Any, bits: int, group_size: int, skip: tuple[str, ...]) -> QuantConfig:
    if bits not in (2, 4, 8):
        raise ValueError(f"GPTQ with bits={bits} is not supported: loraplex loads 2, 4 and "
                         "8-bit GPTQ checkpoints")
    fmt = str(_get(raw, "checkpoint_format", "gptq") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format={fmt!r} is not supported: loraplex loads the "
                         "'gptq' and 'gptq_v2' formats")
    if _get(raw, "lm_head", False):
        raise ValueError("a GPTQ checkpoint with a quantized lm_head is not supported yet")
    # GPTQModel's per-module rules: "-:regex" leaves the modules it matches unquantized
    dynamic = _get(raw, "dynamic", None) or {}
    if any(not str(rule).startswith("-:") for rule in dynamic):
        raise ValueError("GPTQ per-module overrides (quantization_config.dynamic's positive "
                         "rules: other bits or group sizes) are not supported yet; its "
                         "\"-:\" rules (modules left unquantized) are")
    skip += tuple("re:" + str(rule)[2:] for rule in dynamic)
    return QuantConfig("gptq", bits, group_size, zero_offset=1 if fmt == "gptq" else 0,
                       desc_act=bool(_get(raw, "desc_act", False)),
                       modules_to_not_convert=skip)


def _awq(raw: Any, bits: int, group_size: int, skip: tuple[str, ...]) -> QuantConfig:
    version = str(_get(raw, "version", "gemm") or "gemm").lower()
    if bits != 4 or version != "gemm":
        raise ValueError(f"AWQ with bits={bits}, version={version!r} is not supported: "
                         "loraplex loads 4-bit AWQ checkpoints in the GEMM layout")
    if not _get(raw, "zero_point", True):
        raise ValueError("AWQ without zero points (zero_point=false) is not supported yet")
    return QuantConfig("awq", bits, group_size, modules_to_not_convert=skip)


def _bitsandbytes(raw: Any) -> QuantConfig:
    skip = tuple(_get(raw, "llm_int8_skip_modules", None) or ())
    if _get(raw, "load_in_8bit", False):
        if _get(raw, "llm_int8_has_fp16_weight", False):
            raise ValueError("bitsandbytes 8-bit with llm_int8_has_fp16_weight=true (fp16 "
                             "weights, a training setup) is not supported")
        return QuantConfig("bitsandbytes", 8, -1, modules_to_not_convert=skip)
    if not _get(raw, "load_in_4bit", False):
        raise ValueError("bitsandbytes quantization_config with neither load_in_4bit nor "
                         "load_in_8bit set")
    quant_type = str(_get(raw, "bnb_4bit_quant_type", "fp4") or "fp4").lower()
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes bnb_4bit_quant_type={quant_type!r} is not supported: "
                         "loraplex loads nf4 and fp4")
    return QuantConfig("bitsandbytes", 4, BNB_BLOCKSIZE, quant_type=quant_type,
                       modules_to_not_convert=skip)


def _fp8_config(block: Any, skip: tuple[str, ...]) -> QuantConfig:
    if block is not None and (len(block) != 2 or any(int(b) < 1 for b in block)):
        raise ValueError(f"fp8 weight block {block!r}: expected [outputs, inputs]")
    block = (int(block[0]), int(block[1])) if block is not None else None
    return QuantConfig("fp8", 8, block[1] if block else -1, fp8_block=block,
                       modules_to_not_convert=skip)


def _fp8(raw: Any) -> QuantConfig:
    """transformers' / Qwen's / DeepSeek's / vLLM's `quant_method: fp8`."""
    fmt = str(_get(raw, "fmt", "e4m3") or "e4m3").lower()
    if fmt != "e4m3":
        raise ValueError(f"fp8 fmt={fmt!r} is not supported: loraplex loads e4m3 weights")
    skip = tuple(_get(raw, "modules_to_not_convert", None) or _get(raw, "ignored_layers", None)
                 or ())
    return _fp8_config(_get(raw, "weight_block_size", None), skip)


CT_INT_FORMATS = ("pack-quantized", "naive-quantized", "int-quantized")


def _compressed_tensors(raw: Any) -> QuantConfig:
    """llm-compressor's checkpoints: FP8 weights (format float-quantized: 8-bit floats per
    tensor, channel or block; weight-only or with FP8 activations, _fp8_activations), NVFP4
    ones (_nvfp4) or int weights, with or without int8 activations
    (_compressed_tensors_int)."""
    fmt = str(_get(raw, "format", "") or "")
    groups = list((_get(raw, "config_groups", None) or {}).values())
    weights = [_get(g, "weights", None) or {} for g in groups]
    # newer checkpoints name the format per group ("mixed-precision" at the top)
    formats = {str(_get(g, "format", None) or fmt) for g in groups}
    # `ignore`: exact module names, or "re:" regexes
    skip = tuple(m if m.startswith("re:") else "re:" + re.escape(m) + "$"
                 for m in _get(raw, "ignore", None) or ())
    for key, plain in (("transform_config", ()), ("sparsity_config", ("dense",))):
        extra = _get(raw, key, None) or {}
        if extra and (not plain or str(_get(extra, "format", "")) not in plain):
            raise ValueError(f"compressed-tensors checkpoint with a {key} ({extra}) is not "
                             "supported: its weights are not plain quantized ones")
    if weights and formats <= set(CT_INT_FORMATS) and all(
            _get(w, "type") == "int" for w in weights):
        return _compressed_tensors_int(groups, weights, skip)
    if weights and formats == {"nvfp4-pack-quantized"}:
        return _nvfp4(groups, weights, skip)
    if sorted(formats) != ["float-quantized"] or not weights or any(
            _get(w, "num_bits") != 8 or _get(w, "type") != "float" for w in weights):
        raise ValueError(f"compressed-tensors checkpoint (format {fmt!r}, weights "
                         f"{[{k: _get(w, k) for k in ('num_bits', 'type')} for w in weights]}) "
                         "is not supported yet: loraplex loads its FP8 weights "
                         "(format float-quantized, 8-bit float), NVFP4 ones "
                         "(nvfp4-pack-quantized) and int ones "
                         f"({', '.join(CT_INT_FORMATS)}; 4 or 8 bits)")
    strategies = {str(_get(w, "strategy", "tensor")) for w in weights}
    blocks = {tuple(_get(w, "block_structure", None) or ()) for w in weights}
    if len(strategies) != 1 or len(blocks) != 1 or not strategies <= {"tensor", "channel",
                                                                         "block"}:
        raise ValueError(f"compressed-tensors FP8 weights with strategies {sorted(strategies)} "
                         "are not supported: one of tensor, channel or block for all of them")
    block = next(iter(blocks)) if strategies == {"block"} else None
    return replace(_fp8_config(block or None, skip),
                   input_activations=_fp8_activations(_input_activations(groups)))


def _input_activations(groups: list[Any]) -> dict | None:
    """The config groups' input_activations: one scheme for all, or none; output
    activations are refused."""
    found = {json.dumps(dict(_get(g, "input_activations", None) or {}), sort_keys=True)
             for g in groups}
    for g in groups:
        if _get(g, "output_activations", None):
            raise ValueError(f"compressed-tensors output activation quantization "
                             f"({dict(_get(g, 'output_activations'))}) is not supported")
    if len(found) != 1:
        raise ValueError(f"compressed-tensors config_groups with different input activation "
                         f"schemes ({sorted(found)}) are not supported: one for every Linear")
    a = json.loads(found.pop())
    return a or None


def _int8_activations(a: dict | None) -> ActivationQuant | None:
    """int8, dynamic per token and symmetric (llm-compressor's W8A8), or static per
    tensor (symmetric or not), what vLLM's int8 W8A8 runs."""
    if a is None:
        return None
    dynamic, strategy = a.get("dynamic") is True, str(a.get("strategy", "tensor"))
    symmetric = a.get("symmetric", True) is not False
    if a.get("type") != "int" or a.get("num_bits") != 8 or (strategy, dynamic) not in (
            ("token", True), ("tensor", False)) or (dynamic and not symmetric):
        raise ValueError(f"compressed-tensors input activations {a} are not supported on "
                         "int weights: loraplex runs int8 ones, dynamic per token "
                         "(symmetric) or static per tensor, as vLLM's W8A8 int8")
    return ActivationQuant(dynamic=dynamic, symmetric=symmetric)


def _fp8_activations(a: dict | None) -> FloatActivationQuant | None:
    """FP8 (e4m3, symmetric): dynamic per token (FP8_DYNAMIC) or per group of inputs
    (FP8_BLOCK's), or static per tensor (FP8, `input_scale`)."""
    if a is None:
        return None
    dynamic, strategy = a.get("dynamic") is True, str(a.get("strategy", "tensor"))
    group = int(a.get("group_size") or 0)
    if a.get("type") != "float" or a.get("num_bits") != 8 or a.get("symmetric") is False \
            or (strategy, dynamic) not in (("token", True), ("group", True),
                                           ("tensor", False)) \
            or (strategy == "group" and group < 1):
        raise ValueError(f"compressed-tensors input activations {a} are not supported on "
                         "FP8 weights: loraplex runs FP8 ones (symmetric), dynamic per "
                         "token or per group of inputs, or static per tensor")
    return FloatActivationQuant(8, dynamic, group if strategy == "group" else -1)


def _nvfp4(groups: list[Any], weights: list[Any], skip: tuple[str, ...]) -> QuantConfig:
    """NVFP4 (nvfp4-pack-quantized): e2m1 weights two per byte, an FP8 scale per 16 inputs
    over a per-tensor global scale; activations none (NVFP4A16) or NVFP4 too (NVFP4:
    dynamic per 16 inputs over the static input_global_scale)."""
    keys = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic")
    schemes = {tuple(_get(w, k) for k in keys) for w in weights}
    want = (4, "float", "tensor_group", 16, True, False)
    if schemes != {want}:
        raise ValueError(f"compressed-tensors nvfp4-pack-quantized weights "
                         f"{[dict(zip(keys, s)) for s in schemes]} are not supported: "
                         f"loraplex loads NVFP4 ones ({dict(zip(keys, want))})")
    a = _input_activations(groups)
    acts = None
    if a is not None:
        if (a.get("num_bits"), a.get("type"), a.get("strategy"), a.get("group_size"),
                a.get("dynamic"), a.get("symmetric", True)) != (4, "float", "tensor_group",
                                                                16, "local", True):
            raise ValueError(f"compressed-tensors input activations {a} are not supported "
                             "on NVFP4 weights: loraplex runs NVFP4 ones (dynamic 'local' "
                             "per 16 inputs, over a static input_global_scale)")
        acts = FloatActivationQuant(4, dynamic=True, group_size=16)
    targets = sorted({str(t) for g in groups for t in _get(g, "targets", None) or ()})
    if targets != ["Linear"]:
        raise ValueError(f"compressed-tensors NVFP4 config_groups targeting {targets} are "
                         "not supported: loraplex loads one scheme for every Linear (less "
                         "the `ignore` list)")
    cfg = QuantConfig("nvfp4", 4, 16, modules_to_not_convert=skip, input_activations=acts)
    if not cfg.skips("lm_head"):
        raise ValueError("a compressed-tensors checkpoint with a quantized lm_head (not in its "
                         "`ignore` list) is not supported yet")
    return cfg


def _compressed_tensors_int(groups: list[Any], weights: list[Any],
                            skip: tuple[str, ...]) -> QuantConfig:
    """W4A16 / W8A16 (vLLM's compressed_tensors_wNa16): int weights per channel or group,
    symmetric or with zero points, act-order g_idx or not; W8A8 (int8 activations too:
    _int8_activations); one scheme for every Linear."""
    activations = _int8_activations(_input_activations(groups))
    keys = ("num_bits", "strategy", "group_size", "symmetric", "actorder", "dynamic")
    schemes = {tuple(_get(w, k) for k in keys) for w in weights}
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors config_groups with different int weight schemes "
                         f"({[dict(zip(keys, s)) for s in schemes]}) are not supported: one "
                         "scheme for every Linear")
    targets = sorted({str(t) for g in groups for t in _get(g, "targets", None) or ()})
    if targets != ["Linear"]:
        raise ValueError(f"compressed-tensors config_groups targeting {targets} are not "
                         "supported: loraplex loads one int scheme for every Linear (less "
                         "the `ignore` list)")
    w = weights[0]
    bits, strategy = int(_get(w, "num_bits", 8)), str(_get(w, "strategy", "tensor"))
    if bits not in (4, 8):
        raise ValueError(f"compressed-tensors int weights with num_bits={bits} are not "
                         "supported: loraplex loads 4 and 8-bit ones")
    if strategy not in ("channel", "group") or _get(w, "dynamic", False):
        raise ValueError(f"compressed-tensors int weights with strategy={strategy!r} (dynamic="
                         f"{_get(w, 'dynamic', False)}) are not supported: static channel or "
                         "group scales, as vLLM's W4A16 / W8A16")
    group_size = int(_get(w, "group_size", 0) or 0) if strategy == "group" else -1
    if strategy == "group" and group_size < 1:
        raise ValueError(f"compressed-tensors group strategy with group_size={group_size}")
    actorder = _get(w, "actorder", None)
    cfg = QuantConfig("compressed-tensors", bits, group_size,
                      desc_act=actorder is True or str(actorder) == "group",
                      modules_to_not_convert=skip,
                      implicit_zero=bool(_get(w, "symmetric", True)),
                      input_activations=activations)
    if not cfg.skips("lm_head"):
        raise ValueError("a compressed-tensors checkpoint with a quantized lm_head (not in its "
                         "`ignore` list) is not supported yet")
    return cfg

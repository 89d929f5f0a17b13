"""A GGUF file (llama.cpp's format) as a base model: config, tokenizer and weights.

Read the way transformers reads one (`from_pretrained(dir, gguf_file=...)`), since that is
the code PEFT adapters' users trust: the config and the tokenizer from the file's metadata
through transformers, the tensors renamed to HF's names and llama.cpp's changes undone
(Llama's q/k row permutation for its rope layout, Gemma's norms stored as 1 + w) by
transformers' tensor processors. A mixture of experts' experts, which llama.cpp stacks per
layer (`blk.N.ffn_gate_exps.weight` [E, I, H]), load expert by expert. The decoder's Q8_0
or Q4_0 matrices stay quantized, their codes and fp16 scales moved into GPTQ's packed
layout (models/gguf_quant.py: exact, a half / a quarter of bf16's memory); every other
tensor (K-quants, F16, the embeddings, lm_head, the routers) is dequantized by the `gguf`
package into the model's dtype as it loads, one tensor at a time.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import transformers

from loraplex.models.gguf_hub import download_gguf, hub_gguf_name
from loraplex.models.gguf_quant import (
    GGUFQuantPlan,
    codes_and_scales,
    gptq_config,
    packed_tensors,
    quant_plan,
)

logger = logging.getLogger(__name__)

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

GGUF_MAGIC = b"GGUF"
# llama.cpp's `general.architecture` values served: transformers reads them and our
# registry has the model (llama.cpp writes Llama and Mistral files as "llama")
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
                                "qwen2moe", "qwen3moe", "minimax-m2")
# metadata transformers' GGUF config does not read (5.x), whose config defaults are one
# released model's sizes (Qwen1.5-MoE-A2.7B's, Qwen3-30B-A3B's): read here so the others
# (Qwen2-57B-A14B, Qwen3-235B-A22B ...) get theirs
MISSED_CONFIG_KEYS = {
    "qwen2moe": {"expert_feed_forward_length": "moe_intermediate_size",
                 "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}
# llama.cpp's experts, stacked per layer: [E, out, in]
STACKED_EXPERTS = re.compile(r"blk\.(?P<layer>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.weight")
# where the HF checkpoints (what loraplex reads) keep one expert's projections
_QWEN_EXPERTS = ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
EXPERT_MODULES = {"qwen2moe": _QWEN_EXPERTS, "qwen3moe": _QWEN_EXPERTS,
                  "minimax-m2": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}
# transformers 5's module names -> its checkpoints' (MiniMax-M2's router and bias)
HF_RENAMES = {"minimax-m2": ((".mlp.", ".block_sparse_moe."),)}


def require_gguf() -> Any:
    """The `gguf` package, which transformers' GGUF reading needs; a clear error without."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("loading a GGUF file needs the `gguf` package: pip install "
                          "'loraplex[gguf]'") from e
    return gguf


def _has_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def is_gguf_model(model: str, load_format: str = "auto") -> bool:
    """`model` names a GGUF base: load_format="gguf", a `.gguf` name, one of vLLM's hub
    forms (`repo_id:quant_type`), or a local file starting with GGUF's magic."""
    if load_format == "gguf" or model.endswith(".gguf"):
        return True
    if os.path.isfile(model):
        return _has_magic(model)
    return not os.path.exists(model) and hub_gguf_name(model) is not None


def gguf_file(model: str, load_format: str = "auto", revision: str | None = None
              ) -> str | None:
    """The local GGUF file `model` names (see is_gguf_model; a hub form fetched into the
    hub cache), or None for an HF checkpoint."""
    if not is_gguf_model(model, load_format):
        return None
    if os.path.isdir(model):
        raise ValueError(f"model {model!r} is a directory, not a GGUF file "
                         "(load_format='gguf' takes a .gguf file)")
    if not os.path.exists(model):
        if (hub := hub_gguf_name(model)) is not None:
            return download_gguf(hub, revision)
        raise ValueError(f"model {model!r}: no such GGUF file (a local path, "
                         "`repo_id:quant_type` or `repo_id/file.gguf`)")
    if not _has_magic(model):
        raise ValueError(f"model {model!r} is not a GGUF file (it does not start with "
                         "GGUF's magic bytes)")
    return model


def check_gguf(path: str) -> str:
    """The file's llama.cpp architecture, after checking that its header and tensor table
    read and that every tensor's data is in the file (a truncated download fails here, at
    start-up, not halfway through loading)."""
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())
    except Exception as e:  # numpy / struct errors of a cut or corrupt file
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                         "is it truncated?") from e
    if (split := reader.fields.get("split.count")) is not None and int(split.contents()) > 1:
        raise ValueError(f"{path} is one part of a GGUF split in {split.contents()} files: "
                         "merge them into one first (llama.cpp's `llama-gguf-split --merge`)")
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: tensor {t.name} has {t.data.nbytes} of its "
                             f"{t.n_bytes} bytes: the file is truncated")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         + ", ".join(SUPPORTED_GGUF_ARCHITECTURES))
    if arch in EXPERT_MODULES and TRANSFORMERS_MAJOR < 5:
        raise ValueError(f"{path}: GGUF architecture {arch!r} (a mixture of experts) needs "
                         f"transformers 5, whose GGUF reading maps its experts (installed: "
                         f"{transformers.__version__})")
    if arch == "llama" and any(STACKED_EXPERTS.fullmatch(t.name) for t in reader.tensors):
        raise ValueError(f"{path}: a \"llama\" GGUF with experts (Mixtral as llama.cpp writes "
                         "it) is not supported: transformers reads it as a dense Llama")
    # Llama 3's rope_freqs, Phi-3's LongRoPE rope_factors_long / _short; yarn, linear keys
    scaled = [k for k in reader.fields if k.startswith(f"{arch}.rope.scaling.")]
    scaled += [t.name for t in reader.tensors if t.name.startswith("rope_")]
    if scaled:
        logger.warning("%s has rope scaling (%s), which transformers' GGUF config does not "
                       "read, so neither does loraplex: give the original config.json's "
                       "rope_scaling through hf_overrides (--hf-overrides)", path,
                       ", ".join(scaled))
    return arch


def gguf_config(path: str) -> Any:
    """The HF config transformers builds from the file's metadata (with the keys it misses:
    MISSED_CONFIG_KEYS), and as its quantization_config the GPTQ layout that the file's
    Q8_0 / Q4_0 matrices are kept in (models/gguf_quant.py), if it has any."""
    from transformers import AutoConfig

    gguf = require_gguf()
    arch = check_gguf(path)
    folder, name = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    reader = gguf.GGUFReader(path)
    for key, attr in MISSED_CONFIG_KEYS.get(arch, {}).items():
        if (field := reader.fields.get(f"{arch}.{key}")) is not None:
            setattr(config, attr, int(field.contents()))
    plan = _quant_plan(reader, _hf_names(config, _processor(config, arch), arch), arch)
    if plan.bits is not None:
        config.quantization_config = gptq_config(plan.bits, plan.skipped)
    return config


def gguf_tokenizer(path: str) -> Any:
    """The tokenizer (and chat template) transformers builds from the file's metadata."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _hf_names(hf_config: Any, processor: Any, arch: str) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, from transformers' map over an HF model of
    this config built on the meta device (no memory). The map is the file's architecture's
    (transformers derives it from the config's model_type, which fails for a "llama" file
    it reads as Mistral because its general.name is "mistral")."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(_unquantized(hf_config))
    if "processor" in inspect.signature(get_gguf_hf_weights_map).parameters:
        names = get_gguf_hf_weights_map(hf_model, processor, model_type=arch)
    else:  # transformers 4.x: no processor argument
        names = get_gguf_hf_weights_map(hf_model, model_type=arch)
    for theirs, ours in HF_RENAMES.get(arch, ()):
        names = {k: v.replace(theirs, ours) for k, v in names.items()}
    return names


def _processor(hf_config: Any, arch: str) -> Any:
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=_unquantized(hf_config).to_dict())


def _unquantized(hf_config: Any) -> Any:
    """The config without its quantization_config (the names and the tensor processors do
    not depend on it; transformers 4.x's to_dict cannot write one turned off, None)."""
    if not hasattr(hf_config, "quantization_config"):
        return hf_config
    hf_config = copy.copy(hf_config)
    del hf_config.quantization_config
    return hf_config


def _stacked_modules(m: re.Match, num_experts: int, arch: str) -> list[str]:
    """Every expert's HF module of a stacked expert tensor (EXPERT_MODULES)."""
    block, leaves = EXPERT_MODULES[arch]
    return [f"model.layers.{m['layer']}.{block}.experts.{e}.{leaves[m['proj']]}"
            for e in range(num_experts)]


def _quant_plan(reader: Any, names: dict[str, str], arch: str) -> GGUFQuantPlan:
    """models/gguf_quant.py's plan for this file (`names`: _hf_names'): which matrices
    stay packed."""
    modules_of = {}
    for t in reader.tensors:
        if m := STACKED_EXPERTS.fullmatch(t.name):
            modules_of[t.name] = _stacked_modules(m, int(t.shape[-1]), arch)
        elif t.name.endswith(".weight") and len(t.shape) == 2 and t.name in names:
            modules_of[t.name] = [names[t.name].removesuffix(".weight")]
    return quant_plan(list(reader.tensors), modules_of)


def iterate_gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of each of the file's tensors, one at a time: what transformers'
    load_gguf_checkpoint computes, without holding them all; the matrices the config's
    quantization_config keeps (gguf_config) as GPTQ's qweight / qzeros / scales."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    processor = _processor(hf_config, arch)
    names = _hf_names(hf_config, processor, arch)
    quant = getattr(hf_config, "quantization_config", None)
    plan = _quant_plan(reader, names, arch) if isinstance(quant, dict) and \
        quant.get("quant_method") == "gguf" else GGUFQuantPlan(None, frozenset(), [])
    skipped = []
    for tensor in reader.tensors:
        kept = tensor.name in plan.kept
        if kept:
            codes, scales = codes_and_scales(tensor.data, tensor.tensor_type.name)
        m = STACKED_EXPERTS.fullmatch(tensor.name)
        if m and kept:
            for module, c, s in zip(_stacked_modules(m, codes.shape[0], arch), codes, scales,
                                    strict=True):
                yield from packed_tensors(module, c, s, plan.bits)
            continue
        if m:  # transformers fuses them: we load them expert by expert
            stack = gguf.dequantize(tensor.data, tensor.tensor_type)
            for module, w in zip(_stacked_modules(m, stack.shape[0], arch), stack, strict=True):
                yield f"{module}.weight", torch.from_numpy(np.array(w, copy=True))
            continue
        if kept:  # the processor's row changes (Llama's q/k permutation) on both
            codes, scales = (_process(processor, names, tensor.name, a) for a in (codes, scales))
            yield from packed_tensors(names[tensor.name].removesuffix(".weight"), codes, scales,
                                      plan.bits)
            continue
        result = processor.process(weights=gguf.dequantize(tensor.data, tensor.tensor_type),
                                   name=tensor.name, tensor_key_mapping=names,
                                   parsed_parameters={"tensors": {}})
        if result.name not in names:  # transformers drops them too (llama.cpp's rope_freqs)
            skipped.append(tensor.name)
            continue
        yield names[result.name], torch.from_numpy(np.array(result.weights, copy=True))
    if skipped:
        logger.info("%s: skipped %d tensors that have no HF parameter: %s", path,
                    len(skipped), ", ".join(skipped[:8]))


def _process(processor: Any, names: dict[str, str], name: str, array: np.ndarray
             ) -> np.ndarray:
    return processor.process(weights=array, name=name, tensor_key_mapping=names,
                             parsed_parameters={"tensors": {}}).weights


def log_dequantized_size(path: str, model: torch.nn.Module) -> None:
    """Say what loading cost: the file's size against the loaded weights', of which the
    matrices kept quantized (GPTQ's int32 words and fp16 scales)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    size = sum(t.numel() * t.element_size() for _, t in tensors)
    kept = sum(t.numel() * t.element_size() for n, t in tensors
               if t.dtype == torch.int32 or n.endswith("scales"))
    dtype = str(next(t.dtype for n, t in tensors if t.is_floating_point()
                     and not n.endswith("scales"))).replace("torch.", "")
    quant = getattr(model.args, "quant", None)
    logger.info("GGUF %s (%s on disk) loaded into %s: %s, the rest dequantized into %s",
                os.path.basename(path), _size(os.path.getsize(path)), _size(size),
                f"{_size(kept)} of Q{quant.bits}_0 matrices kept quantized (GPTQ layout)"
                if quant is not None else "no tensor kept quantized", dtype)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

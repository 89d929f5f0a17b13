"""Hugging Face directory or hub id -> config, tokenizer path and weights in our modules.

Reads config.json with transformers' AutoConfig, weights from (sharded) safetensors or,
as a fallback, pytorch_model*.bin. HF's separate q/k/v and gate/up weights are copied
into our packed projections through the model's `packed_modules_mapping`; Mixtral's
per-expert w1 / w2 / w3 into the stacked expert weights (FusedExperts.load_expert), and
gpt-oss's fused ones (experts.gate_up_proj ...) too (FusedExperts.load_fused). Quantized
linears and the routers (GateLinear: plain, dequantized from a checkpoint that quantized
them) take their tensors through their own load_shard. FP8 checkpoints' KV cache scales
(self_attn.k_scale / v_scale / kv_scale, or under self_attn.attn as vLLM names them) go to
the layer's Attention (used with an FP8 KV cache only, as in vLLM).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from loraplex.layers.attention import Attention
from loraplex.layers.classifier import is_classifier_key
from loraplex.layers.experts import FusedExperts
from loraplex.layers.moe import GateLinear
from loraplex.layers.quantization import QuantLinear
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.llava import VisionWeights

logger = logging.getLogger(__name__)

_KV_SCALES = ("k_scale", "v_scale", "kv_scale")
_WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.json", "*.model", "*.txt", "*.jinja",
                    "tokenizer.model.v*"]  # (Mistral's sentencepiece files)


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local dir as is; otherwise a hub id fetched (or found in the offline cache)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, allow_patterns=_WEIGHT_PATTERNS)
    except Exception as e:  # hub errors come in many types; the message says which
        raise ValueError(f"model {model!r} is neither a local directory nor a reachable "
                         f"Hugging Face hub id: {e}") from e


def iterate_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    # (a PEFT adapter saved beside the weights, as Granite Speech ships its own, is not
    # the model's: it loads as an adapter, default_mm_loras)
    files = sorted(f for f in glob.glob(os.path.join(path, "*.safetensors"))
                   if not os.path.basename(f).startswith("adapter_model"))
    # Mistral's repos ship consolidated*.safetensors beside the HF files: the same weights
    # under Mistral's names (load_format="mistral" reads them: models/mistral_format.py)
    hf_files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    files = hf_files or files
    if files:
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, st.get_tensor(name)
        return
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    for f in files:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _split_name(name: str) -> tuple[str, str]:
    """(module, parameter) of a checkpoint tensor. bitsandbytes' 4-bit state sits under the
    weight's name (q_proj.weight.absmax): its parameter is "weight.absmax"."""
    head, sep, tail = name.partition(".weight.")
    if sep:
        return head, "weight." + tail
    module, _, param = name.rpartition(".")
    return module, param


def _stacked_row(name: str, stacks: tuple[tuple[str, str], ...]) -> tuple[str, int] | None:
    """(our parameter, its row) of a checkpoint tensor that is one row of it (StableLM's
    q_layernorm.norms.{head}.weight: a row of q_norm.weight), else None."""
    for theirs, ours in stacks:
        head, sep, rest = name.partition(theirs)
        row, _, param = rest.partition(".")
        if sep and row.isdigit():
            return f"{head}{ours}{param}", int(row)
    return None


def _layer_index(name: str) -> int:
    """The decoder layer a tensor belongs to (model.layers.{i}.*), or -1."""
    head, _, rest = name.partition("model.layers.")
    index = rest.partition(".")[0]
    return int(index) if not head and index.isdigit() else -1


def load_weights(model: LlamaForCausalLM, path: str, vision: VisionWeights | None = None,
                 headless: bool = False,
                 classifier: dict[str, torch.Tensor] | None = None,
                 weights: Iterator[tuple[str, torch.Tensor]] | None = None) -> None:
    """The checkpoint's weights into `model`; a multimodal checkpoint's vision tower and
    projector into `vision` (models/llava.py, models/gemma3_vision.py) in the same pass, or skipped without one.
    `headless`: a `*Model` checkpoint (an embedding model's): its names lack the
    `model.` prefix and it has no lm_head (left unloaded: a pooling runner never uses it).
    `classifier`: a `*ForSequenceClassification` checkpoint's head tensors (score.*) go
    there (the engine applies it per request, layers/classifier.py).
    `weights`: the (HF name, tensor) pairs to load, when they are not `path`'s safetensors
    (a GGUF file's: models/gguf_loader.py)."""
    params = dict(model.named_parameters())
    quantized = {n: m for n, m in model.named_modules()
                 if isinstance(m, QuantLinear | GateLinear)}
    fused_experts = {n: m for n, m in model.named_modules() if isinstance(m, FusedExperts)}
    attention = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    attention.update({n.rpartition(".")[0]: m for n, m in list(attention.items())})
    loaded: set[str] = set()
    stacked_rows: dict[str, set[int]] = {}  # checkpoint_stacks: the rows each one has had
    past_layers = 0  # tensors of layers past num_hidden_layers (multi-token prediction)
    text_only = model.args.text_only  # a multimodal checkpoint: its language model only
    tensors = weights if weights is not None else iterate_weights(path)
    for name, tensor in tqdm(tensors, desc="Loading weights", unit=" tensors", leave=False,
                             disable=None):
        if classifier is not None and is_classifier_key(name) and "." not in \
                name.rpartition(".")[0]:  # score.weight: the classifier's head
            classifier[name] = tensor
            continue
        if headless and not name.startswith("model."):  # a `*Model` checkpoint's names
            name = "model." + name
        if text_only is not None and (ours := text_only.name(name)) is None:
            if vision is not None:  # the vision tower or the projector
                vision.load_weight(name, tensor)
            continue
        name = ours if text_only is not None else name
        prefix = model.args.checkpoint_prefix  # (BLOOM's saves from BloomModel lack it)
        if prefix and not name.startswith((prefix, "lm_head.")):
            name = prefix + name
        for theirs, ours_part in model.args.checkpoint_renames:
            name = name.replace(theirs, ours_part)
        if "rotary_emb.inv_freq" in name or name.endswith(model.args.checkpoint_skips):
            continue
        if (stacked := _stacked_row(name, model.args.checkpoint_stacks)) is not None:
            target, row = stacked
            param = params.get(target)
            if param is None or row >= param.shape[0] or param.shape[1:] != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} ({tuple(tensor.shape)}) is no row "
                                 f"of {target}")
            with torch.no_grad():
                param[row].copy_(tensor)
            stacked_rows.setdefault(target, set()).add(row)
            if len(stacked_rows[target]) == param.shape[0]:  # every row: loaded
                loaded.add(target)
            continue
        if _layer_index(name) >= model.args.num_layers or name.startswith("mtp."):
            past_layers += 1  # (Qwen3-Next's and Qwen3.5's under mtp.*)
            continue
        if name == "lm_head.weight" and model.args.tie_word_embeddings:
            continue
        module_name, param_name = _split_name(name)
        prefix, _, leaf = module_name.rpartition(".")
        if param_name in _KV_SCALES and (attn := attention.get(module_name)) is not None:
            attn.load_kv_scale(name, tensor)
            continue
        if (experts := fused_experts.get(module_name)) is not None:  # gpt-oss's, Llama
            # 4's, Qwen3-VL-MoE's
            loaded.add(f"{module_name}.{experts.load_fused(param_name, tensor)}")
            continue
        experts_name, _, expert = prefix.rpartition(".")
        if expert.isdigit() and (experts := fused_experts.get(experts_name)) is not None:
            loaded.add(f"{experts_name}."
                       f"{experts.load_expert(int(expert), leaf, tensor, param_name)}")
            continue
        if leaf in model.packed_modules_mapping:
            packed, shard = model.packed_modules_mapping[leaf]
            target = model.get_submodule(f"{prefix}.{packed}")
            target.load_shard(param_name, tensor, shard)
            if isinstance(target, QuantLinear):
                param_name = target.param_of(param_name)
            loaded.add(f"{prefix}.{packed}.{param_name}")
            continue
        if module_name in quantized:  # its own checks (shapes, g_idx, a saved zero bias)
            quantized[module_name].load_shard(param_name, tensor, 0)
            loaded.add(f"{module_name}.{quantized[module_name].param_of(param_name)}")
            continue
        if name not in params:
            logger.warning("ignoring checkpoint tensor %s (no such parameter)", name)
            continue
        if params[name].shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"model expects {tuple(params[name].shape)}")
        if tensor.dtype == torch.float8_e4m3fn:  # its scale is elsewhere: never copy as is
            raise ValueError(f"checkpoint tensor {name} is FP8 where the model keeps plain "
                             "weights (an FP8 lm_head or embedding is not supported; a layer "
                             "the quantization_config leaves out must be saved unquantized)")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    if past_layers:
        logger.info("skipped %d checkpoint tensors of layers past num_hidden_layers=%d "
                    "(multi-token prediction layers, as GLM-4.5 and DeepSeek-V3 ship them: "
                    "loraplex does not use them)", past_layers, model.args.num_layers)
    for layer in [*quantized.values(), *fused_experts.values()]:
        layer.finish_loading()
    if vision is not None:
        vision.check_loaded(path)
    missing = [n for n in params if n not in loaded
               and not (n == "lm_head.weight" and (model.args.tie_word_embeddings
                                                   or headless))
               and not (n == "lm_head.bias" and headless)]
    for head in ("lm_head.weight", "lm_head.bias"):
        if headless and head in params and head not in loaded:
            with torch.no_grad():  # finite: a GPU profile run still samples from it
                params[head].zero_()
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights of the right shapes, for benchmarks of big models without a download."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            module_name = name.rpartition(".")[0]
            if hasattr(model.get_submodule(module_name), "fill_random"):
                continue  # quantized: below
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            gen = torch.Generator(device=p.device).manual_seed(seed + i)
            p.normal_(0.0, 0.02, generator=gen)
        for i, m in enumerate(m for m in model.modules() if hasattr(m, "fill_random")):
            m.fill_random(torch.Generator().manual_seed(seed + 100_003 * (i + 1)))

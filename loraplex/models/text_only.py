"""Multimodal checkpoints: their language model is a text model loraplex runs (Gemma 3
4B/12B/27B are `Gemma3ForConditionalGeneration`: Gemma 3's text decoder behind a SigLIP
vision tower), so a text request, and an adapter trained on the whole model, are served
by that text model alone.

Their images are served too (`TextOnly.images`): the vision tower and projector load
beside the language model, LLaVA's (`LlavaForConditionalGeneration`; LLaVA-NeXT's
`LlavaNextForConditionalGeneration` with its `image_newline`) into models/llava.py (a
`pixtral` tower, Pixtral-12B's, into models/pixtral.py),
Gemma 3's into models/gemma3_vision.py, Qwen2-VL's and Qwen2.5-VL's
(`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`: a Qwen2
language model with M-RoPE) into models/qwen2_vl.py, Qwen3-VL's
(`Qwen3VLForConditionalGeneration`: a Qwen3 language model with interleaved M-RoPE and
DeepStack; Qwen3-VL-MoE's, `Qwen3VLMoeForConditionalGeneration`, the same over a
Qwen3-MoE whose checkpoint fuses the experts: layers/experts.py `fused`; Qwen3.5's,
without DeepStack, over models/qwen3_next.py's gated DeltaNet models) into
models/qwen3_vl.py, Mistral 3's (`Mistral3ForConditionalGeneration`: a Mistral or
Ministral 3 language model, its text config's model_type) into models/pixtral.py,
InternVL's (`InternVLForConditionalGeneration`: a Qwen2, Qwen3 or Llama language model,
LLaVA's names) into models/internvl.py; an
adapter's LoRA on them is left
out with a warning, as vLLM does (LoRA applies to the language model only), unless the
engine has enable_tower_connector_lora (their linears get adapter slots: lora/tower.py,
which names them through each tower's VisionWeights.ours). A Gemma 3
checkpoint saved without its image processor is served on text (engine/model_loading.py).

The checkpoint names the language model's weights `language_model.model.*` (the hub's
files) and PEFT adapters trained with transformers >= 4.52 name its modules
`model.language_model.*`: `TextOnly.name` maps both onto the text model's names.

LFM2-VL (`Lfm2VlForConditionalGeneration`: an LFM2 language model, models/lfm2.py,
behind a SigLIP2 NaFlex tower) is served with its images too (models/lfm2_vl.py,
engine/lfm2_vl_images.py).

Llama 4 (Scout, Maverick: `Llama4ForConditionalGeneration`, its language model a
`Llama4ForCausalLM` as `language_model.*`, its tower `vision_model.*`) is served with its
images too (models/llama4_vision.py); a checkpoint saved without its image processor is
served on text, as Gemma 3's.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextOnly:
    # the text model that serves it (models/registry.py); None: its text config's model_type
    text_architecture: str | None
    renames: tuple[tuple[str, str], ...]  # name prefix in the checkpoint / adapter -> ours
    skipped: tuple[str, ...]  # name prefixes of the parts a text request never runs
    vision_leaves: tuple[str, ...]  # module names only those parts have (adapter targets)
    images: bool = False  # image inputs served (the skipped parts load beside: llava.py,
    # gemma3_vision.py, qwen2_vl.py, qwen3_vl.py, llama4_vision.py; granite_speech.py,
    # qwen2_audio.py)

    def name(self, name: str) -> str | None:
        """A checkpoint tensor's or an adapter module's name as the text model's; None
        for the vision tower and the projector."""
        for old, new in self.renames:
            if name.startswith(old):
                return new + name[len(old):]
        return None if name.startswith(self.skipped) else name


_LLAVA = TextOnly(
    None,
    renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
             ("language_model.lm_head.", "lm_head.")),
    skipped=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
             "model.multi_modal_projector."),
    vision_leaves=("fc1", "fc2", "out_proj", "linear_1", "linear_2"), images=True)
_LLAVA_NEXT = replace(_LLAVA, skipped=(*_LLAVA.skipped, "image_newline", "model.image_newline"))
# Qwen2-VL: `model.*` and `visual.*` (the hub's files, transformers < 4.52) or
# `model.language_model.*` and `model.visual.*` (saved since); the tower's own leaves
# (Qwen2.5-VL's MLP shares gate/up/down_proj's names with the language model's: its
# LoRA is told apart by the `visual.` prefix)
_QWEN_VL = TextOnly(
    "Qwen2ForCausalLM", renames=(("model.language_model.", "model."),),
    skipped=("visual.", "model.visual."), vision_leaves=("qkv", "proj", "fc1", "fc2", "0", "2"),
    images=True)
# Qwen3-VL: a Qwen3 language model (the same names), its tower's MLP and mergers'
# `linear_fc1` / `linear_fc2`
_QWEN3_VL = replace(_QWEN_VL, text_architecture="Qwen3ForCausalLM",
                    vision_leaves=("qkv", "proj", "linear_fc1", "linear_fc2"))
# Qwen3-VL-MoE: the same tower and names over a Qwen3-MoE (its `qwen3_vl_moe_text` config
# says the experts are fused: models/registry.py `_experts`)
_QWEN3_VL_MOE = replace(_QWEN3_VL, text_architecture="Qwen3MoeForCausalLM")
_IDEFICS3 = TextOnly(
    "LlamaForCausalLM", renames=(("model.text_model.", "model."),),
    skipped=("model.vision_model.", "model.connector."),
    vision_leaves=("fc1", "fc2", "out_proj", "proj"), images=True)
MULTIMODAL: dict[str, TextOnly] = {
    "Gemma3ForConditionalGeneration": TextOnly(
        "Gemma3ForCausalLM",
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector."),
        vision_leaves=("fc1", "fc2", "out_proj"), images=True),
    "LlavaForConditionalGeneration": _LLAVA,
    # LLaVA-NeXT: LLaVA's parts and its image_newline vector
    "LlavaNextForConditionalGeneration": _LLAVA_NEXT,
    # LLaVA-OneVision: LLaVA-NeXT's names over a Qwen2 (its text config's model_type)
    "LlavaOnevisionForConditionalGeneration": _LLAVA_NEXT,
    "Qwen2VLForConditionalGeneration": _QWEN_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL_MOE,
    # Qwen3.5: Qwen3-VL's names and tower (without DeepStack: models/qwen3_vl.py) over a
    # gated DeltaNet language model (models/qwen3_next.py); images (its videos refused)
    "Qwen3_5ForConditionalGeneration": replace(
        _QWEN3_VL, text_architecture="Qwen3_5ForCausalLM"),
    "Qwen3_5MoeForConditionalGeneration": replace(
        _QWEN3_VL, text_architecture="Qwen3_5MoeForCausalLM"),
    # Mistral Small 3.1 / 3.2, Magistral Small, Ministral 3, Devstral Small 2: LLaVA's
    # names; the language model a Mistral or a Ministral 3 (its text config's model_type),
    # the Pixtral tower's own leaves q/k/v/o_proj and gate/up/down_proj the language
    # model's too (their LoRA told apart by the `vision_tower.` prefix)
    "Mistral3ForConditionalGeneration": replace(
        _LLAVA, vision_leaves=("linear_1", "linear_2", "merging_layer")),
    # InternVL3 / InternVL3.5 (-hf): LLaVA's names; the language model a Qwen2, Qwen3 or
    # Llama (its text config's model_type); InternViT's q/k/v_proj share the language
    # model's names (their LoRA told apart by the `vision_tower.` prefix)
    "InternVLForConditionalGeneration": replace(
        _LLAVA, vision_leaves=("projection_layer", "fc1", "fc2", "linear_1", "linear_2"),
        skipped=(*_LLAVA.skipped, "vision_model.", "mlp1.")),  # (the remote layout's)
    # Idefics3, SmolVLM / SmolVLM2: a Llama (SmolLM2) as `model.text_model.*` behind a
    # SigLIP tower `model.vision_model.*` and a connector (models/idefics3.py); the
    # tower's q/k/v_proj share the language model's names (told apart by the prefix)
    "Idefics3ForConditionalGeneration": _IDEFICS3,
    "SmolVLMForConditionalGeneration": _IDEFICS3,
    "Llama4ForConditionalGeneration": TextOnly(
        "Llama4ForCausalLM",
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("vision_model.", "multi_modal_projector.", "model.vision_model.",
                 "model.multi_modal_projector."),
        vision_leaves=("fc1", "fc2", "linear_1", "linear"), images=True),
    # Gemma 4 (E2B, E4B, 26B-A4B, 31B): its language model (models/gemma4.py); its vision
    # tower and embedder load into models/gemma4_vision.py (images and videos served), its
    # audio tower and embedder too (models/gemma4_audio.py); the towers' linears are
    # `linear` inside Gemma4ClippableLinear, and the audio tower's own
    "Gemma4ForConditionalGeneration": TextOnly(
        "Gemma4ForCausalLM",
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.",
                 "model.vision_tower.", "model.audio_tower.", "model.embed_vision.",
                 "model.embed_audio."),
        vision_leaves=("linear", "embedding_projection", "input_proj", "relative_k_proj",
                       "input_proj_linear", "output_proj"), images=True),
    # Granite Speech: a Granite language model behind a conformer encoder and a Q-Former
    # projector (models/granite_speech.py); the hub's files name them `language_model.*`,
    # `encoder.*`, `projector.*`, transformers 5 `model.language_model.*` and so on. Its
    # "images" are audio clips (engine/audio.py)
    "GraniteSpeechForConditionalGeneration": TextOnly(
        "GraniteForCausalLM",
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("encoder.", "projector.", "model.encoder.", "model.projector."),
        vision_leaves=("to_q", "to_kv", "to_out", "input_linear", "out_mid", "up_conv",
                       "down_conv", "query", "key", "value", "dense", "linear"), images=True),
    # Qwen2-Audio: a Qwen2 language model behind Whisper's encoder and a linear projector
    # (models/qwen2_audio.py); LLaVA's layouts under `audio_tower.*` (the encoder's q/k/v_proj
    # share the language model's names: its LoRA is told apart by the prefix)
    "Qwen2AudioForConditionalGeneration": TextOnly(
        "Qwen2ForCausalLM",
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("audio_tower.", "multi_modal_projector.", "model.audio_tower.",
                 "model.multi_modal_projector."),
        vision_leaves=("out_proj", "fc1", "fc2", "linear", "conv1", "conv2"), images=True),
    # Phi-4-multimodal (transformers' native format): a Phi-3 language model under its own
    # names, its image and audio embeddings under `model.embed_tokens_extend.*`
    # (models/phi4mm.py); its config is flat (no text_config: `phi3_text_config`)
    "Phi4MultimodalForCausalLM": TextOnly(
        "Phi3ForCausalLM", renames=(), skipped=("model.embed_tokens_extend.",),
        vision_leaves=("fc1", "fc2", "out_proj", "img_projection_up", "img_projection_down"),
        images=True),
    # Voxtral: a Llama language model (its text config's) behind Whisper's encoder and a
    # two-layer projector (models/voxtral.py); Qwen2-Audio's layouts
    "VoxtralForConditionalGeneration": TextOnly(
        None,
        renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("audio_tower.", "multi_modal_projector.", "model.audio_tower.",
                 "model.multi_modal_projector."),
        vision_leaves=("out_proj", "fc1", "fc2", "linear_1", "linear_2", "conv1", "conv2"),
        images=True),
    # LFM2-VL: an LFM2 language model (models/lfm2.py) behind a SigLIP2 tower and a
    # projector (models/lfm2_vl.py); its tower's q/k/v/out_proj share the language
    # model's names (its LoRA told apart by the `vision_tower.` prefix)
    "Lfm2VlForConditionalGeneration": TextOnly(
        "Lfm2ForCausalLM",
        renames=(("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head.")),
        skipped=("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                 "multi_modal_projector."),
        vision_leaves=("fc1", "fc2", "patch_embedding", "linear_1", "linear_2"),
        images=True),
}
# Gemma 3n (E2B, E4B): Gemma 4's names, its language model (models/gemma3n.py) on text;
# its vision (MobileNetV5) and audio towers and their embedders are not loaded (image and
# audio inputs refused)
MULTIMODAL["Gemma3nForConditionalGeneration"] = replace(
    MULTIMODAL["Gemma4ForConditionalGeneration"], text_architecture="Gemma3nForCausalLM",
    vision_leaves=("embedding_projection", "input_proj_linear", "linear_start", "linear_end",
                   "ffw_layer_1", "ffw_layer_2", "conv"), images=False)
# multimodal checkpoints refused by name, with why (a plain "not supported" would list
# their dense sibling as if it were theirs); none today
REFUSED: dict[str, str] = {}
# what the whole model's config says for its language model: the quantization, the dtype
_INHERITED = ("quantization_config", "dtype", "torch_dtype")


# a quantization config's lists of modules left unquantized (fp8 / GPTQ / AWQ,
# compressed-tensors, bitsandbytes)
_PLAIN_LISTS = ("modules_to_not_convert", "ignored_layers", "ignore", "llm_int8_skip_modules")


def _text_model_names(quant: dict, spec: TextOnly) -> dict:
    """The quantization config with the whole model's module names in its not-convert lists
    as the text model's too (Qwen3.5's FP8 checkpoints list
    `model.language_model.layers.0.linear_attn.in_proj_a`); the tower's, and regexes, as
    they are."""
    quant = dict(quant)
    for key in _PLAIN_LISTS:
        if isinstance(quant.get(key), list):
            quant[key] = [n if n.startswith("re:") else spec.name(n) or n for n in quant[key]]
    return quant


def saves_lm_head(path: str | None) -> bool:
    """Whether the checkpoint's safetensors hold an lm_head tensor (any layout): their
    headers only. False without a path or safetensors."""
    from safetensors import safe_open

    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))) if path else ():
        with safe_open(f, framework="pt") as st:
            if any(k.endswith("lm_head.weight") for k in st.keys()):  # noqa: SIM118
                return True
    return False


def lm_head_tied(hf_config: Any, text_config: Any, path: str | None = None) -> bool:
    """Whether lm_head is the embedding, decided as the installed transformers decides it.
    transformers 5 reads the whole model's flag (which takes the text config's True), but
    leaves them apart when the checkpoint holds both and they differ (Mistral 3's
    config defaults the flag to true over untied checkpoints): an lm_head tensor in the
    checkpoint unties them here (one equal to the embedding gives the same logits);
    4.x reads the text config's, and there the whole model's flag is True by default
    whether or not config.json has it (a LLaVA over an untied Llama would tie)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return bool(getattr(hf_config, "tie_word_embeddings", False)) \
            and not saves_lm_head(path)
    return bool(getattr(text_config, "tie_word_embeddings", False))


def text_only_config(hf_config: Any, path: str | None = None
                     ) -> tuple[Any, TextOnly | None]:
    """(the config to build and serve, its TextOnly) for a multimodal checkpoint loraplex
    serves on text; (hf_config, None) for any other. `path`: the checkpoint's directory
    (whether it saves an lm_head of its own)."""
    archs = getattr(hf_config, "architectures", None) or []
    for a in archs:
        if a in REFUSED:
            raise ValueError(f"model architecture {a}: {REFUSED[a]}")
    name = next((a for a in archs if a in MULTIMODAL), None)
    if name is None:
        return hf_config, None
    spec = MULTIMODAL[name]
    if getattr(hf_config, "text_config", None) is None:  # Phi-4-multimodal's flat config
        from loraplex.models.phi4mm import phi3_text_config

        text = phi3_text_config(hf_config)
    else:
        text = copy.deepcopy(hf_config.text_config)
    text.tie_word_embeddings = lm_head_tied(hf_config, text, path)
    for key in _INHERITED:
        if getattr(hf_config, key, None) is not None:
            setattr(text, key, getattr(hf_config, key))
    if isinstance(getattr(text, "quantization_config", None), dict):
        text.quantization_config = _text_model_names(text.quantization_config, spec)
    text.architectures = [spec.text_architecture] if spec.text_architecture else None
    if not spec.images:
        logger.info("%s: serving its language model (%s) on text; image inputs are not "
                    "supported", name, spec.text_architecture)
    return text, spec

"""How the engine gets its model: the checkpoint's config as served, the tokenizer, the
model's weights (and its vision tower's, its draft model's), and the refusals that must
come before a load. LLMEngine.__init__ calls them in this order:

    _resolve_config    GGUF file / Mistral format / InternVL's remote layout / HF config
                       -> hf_overrides -> the text model alone (text_only) -> Whisper's
                       serving config -> a registered architecture
    _first_tokenizer   where load_tokenizer reads (the `tokenizer` option, a GGUF file),
                       its mode (HF or mistral_common); load_tokenizer: a new copy
    _build             a module in the model's dtype, on its device (the vision tower)
    _check_whisper, _check_hybrid   what such models are not served with
    _load_model        the model built and its weights read (dummy, GGUF, Mistral
                       format, HF safetensors; a classifier's head)
    _load_draft_model  speculative decoding's draft model or EAGLE head, its bytes in
                       the memory plan

A mixin of LLMEngine (engine/llm_engine.py); it reads and sets the engine's attributes
named below.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from loraplex.config import EngineConfig, LoRAConfig, ModelConfig
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.draft_model import load_draft_model
from loraplex.engine.eagle import load_eagle_head
from loraplex.engine.mistral_tokenizer import MistralTokenizer, resolve_tokenizer_mode
from loraplex.engine.pooling_heads import PoolingHeads
from loraplex.layers.classifier import ClassifierHead
from loraplex.layers.quantization import read_side_config
from loraplex.models.gguf_loader import (
    gguf_config,
    gguf_file,
    gguf_tokenizer,
    iterate_gguf_weights,
    log_dequantized_size,
)
from loraplex.models.hf_overrides import apply_hf_overrides, parse_hf_overrides
from loraplex.models.internvl_chat import chat_config as internvl_chat_config
from loraplex.models.llava import VisionWeights
from loraplex.models.loader import init_dummy_weights, load_weights, resolve_model_path
from loraplex.models.mamba_hybrid import has_mamba_layers
from loraplex.models.mistral_format import (
    MistralFormat,
    iterate_mistral_weights,
    mistral_config,
)
from loraplex.models.registry import architecture, build_model
from loraplex.models.text_only import text_only_config
from loraplex.models.whisper import is_whisper, serving_config
from loraplex.worker.memory import MemoryPlan, kv_block_bytes


class ModelLoading:
    """LLMEngine's loading side: the config, tokenizer and weights of its base model."""

    config: EngineConfig
    model_config: ModelConfig
    lora_config: LoRAConfig | None
    gguf: str | None
    mistral_format: MistralFormat
    text_only: bool
    tokenizer_mode: str
    _tokenizer_source: tuple[str, str | None]
    vision: VisionWeights | None
    pooling: PoolingHeads
    classify: bool
    headless: bool
    tokenizer: Any
    model: Any
    memory: MemoryPlan

    def _resolve_config(self, args: EngineArgs) -> tuple[str, Any, Any]:
        """(the checkpoint's local path, its config as served, the whole checkpoint's
        config: the encoders', has_lora_adapter); sets gguf, mistral_format, text_only."""
        # a GGUF file: config, tokenizer and weights from it (models/gguf_loader.py)
        self.gguf = gguf_file(args.model, args.load_format, args.revision)
        path = self.gguf or resolve_model_path(args.model, args.revision)
        # Mistral's own format: params.json, consolidated*.safetensors (mistral_format.py)
        self.mistral_format = MistralFormat() if self.gguf else MistralFormat.resolve(
            path, args.config_format, args.load_format)
        hf_config = gguf_config(path) if self.gguf else mistral_config(path) \
            if self.mistral_format.config else (  # InternVL's remote layout: as its -hf
                internvl_chat_config(path) or AutoConfig.from_pretrained(path))
        apply_hf_overrides(hf_config, parse_hf_overrides(args.hf_overrides))
        read_side_config(hf_config, path)  # older GPTQ / AWQ checkpoints
        whole = hf_config
        hf_config, self.text_only = text_only_config(hf_config, path)  # Gemma 3 4B+: text model
        if is_whisper(hf_config):  # its decoder's positions are max_model_len's limit
            hf_config = serving_config(hf_config)
        architecture(hf_config)
        return path, hf_config, whole

    def _first_tokenizer(self, args: EngineArgs, path: str) -> Any:
        """The engine's tokenizer; sets where load_tokenizer reads it and its mode."""
        self._tokenizer_source = (path if args.tokenizer is None
                                  else resolve_model_path(args.tokenizer), args.tokenizer_revision)
        self.tokenizer_mode = "hf" if self.gguf and args.tokenizer is None else \
            resolve_tokenizer_mode(args.tokenizer_mode, self._tokenizer_source[0])
        return self.load_tokenizer()

    def load_tokenizer(self) -> Any:
        """A new copy of the base's tokenizer: the `tokenizer` option's, else the model's
        (a GGUF file's built from its metadata; tokenizer_mode="mistral": mistral_common's)."""
        source, revision = self._tokenizer_source
        if source == self.gguf:
            return gguf_tokenizer(source)
        if self.tokenizer_mode == "mistral":
            return MistralTokenizer.from_pretrained(source)
        return AutoTokenizer.from_pretrained(source, revision=revision)

    def _check_hybrid(self, hf_config: Any) -> None:
        """A hybrid model (Mamba2 or Mamba-1 mixers, LFM2's short convolutions, gated
        DeltaNets: their state is per sequence, not per token): speculative decoding
        refused. Prefix caching stays on: a cached prefix is used up to the last block whose
        state snapshot is kept (worker/state_snapshots.py). (Granite 4.0's attention-only
        -micro, in the same class, is no hybrid.)"""
        if not has_mamba_layers(hf_config, architecture(hf_config)):
            return
        if self.config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for hybrid models (Mamba2, "
                             "Mamba-1, LFM2, gated DeltaNet: their recurrent state cannot "
                             "roll back rejected drafts)")

    def _check_whisper(self) -> None:
        """What Whisper is not served with, refused at start."""
        if self.config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for Whisper "
                             "(an encoder-decoder model)")
        if self.model_config.runner == "pooling":
            raise ValueError("Whisper runs as a generate model, not a pooling one")

    def _build(self, make: Callable[[], torch.nn.Module]) -> Any:
        """A module made in the model's dtype, on its device."""
        mc = self.model_config
        default = torch.get_default_dtype()
        torch.set_default_dtype(mc.dtype)
        try:
            with torch.device(mc.device):
                return make()
        finally:
            torch.set_default_dtype(default)

    def _lora_tower(self) -> VisionWeights | None:
        """The tower and projector whose linears get adapter slots
        (enable_tower_connector_lora); None: LoRA on the language model only (also when
        the tower is not loaded: served on text)."""
        if not self.lora_config.tower_connector_lora or self.vision is None:
            return None
        return self.vision

    def _load_model(self, hf_config: Any, path: str):
        mc = self.model_config
        model = self._build(lambda: build_model(
            hf_config, mc.quantization,
            self.lora_config.long_lora_scaling_factors if self.lora_config else (),
            self.text_only, mc.max_model_len))
        if mc.load_format == "dummy":
            init_dummy_weights(model, mc.seed)
            if self.vision is not None:
                init_dummy_weights(self.vision, mc.seed + 1)
            if self.classify:
                self.pooling.random_head(hf_config, mc.seed + 2)
        elif self.pooling.lm_head_classifier is not None:
            load_weights(model, path, self.vision)
        elif self.gguf:
            load_weights(model, path, weights=iterate_gguf_weights(path, hf_config))
            log_dequantized_size(path, model)
        elif self.mistral_format.weights:
            load_weights(model, path, self.vision,  # (Voxtral's encoder: models/voxtral.py)
                         weights=iterate_mistral_weights(path, hf_config))
        else:
            heads: dict[str, torch.Tensor] | None = {} if self.classify else None
            load_weights(model, path, self.vision, headless=self.headless, classifier=heads)
            if heads is not None:
                self.pooling.set_head(ClassifierHead.from_tensors(heads, path), path)
        if self.pooling.lm_head_classifier is not None:
            self.pooling.head_from_lm_head(model, self.tokenizer.get_vocab())
        if self.vision is not None:
            self.vision.eval()
        return model.eval()

    def _load_draft_model(self, hf_config: Any, kv_dtype: torch.dtype,
                          block_size: int) -> torch.nn.Module | None:
        """speculative_config's draft model or EAGLE head (None: none, or ngram), its
        weights' and KV blocks' bytes put in the memory plan."""
        spec = self.config.speculative_config
        mc = self.model_config
        draft_model = (load_draft_model(spec, hf_config, self.tokenizer, mc, self._build)
                       if spec and spec.method == "draft_model" else
                       load_eagle_head(spec, hf_config, self.model, mc, self._build)
                       if spec and spec.method in ("eagle", "eagle3") else None)
        if draft_model is not None:
            self.memory.draft_kv_block_bytes = kv_block_bytes(draft_model, kv_dtype, block_size)
            self.memory.draft_weight_bytes = sum(
                t.numel() * t.element_size()
                for t in itertools.chain(draft_model.parameters(), draft_model.buffers())
                if t is not None)
        return draft_model

"""LLMEngine: requests in, one batched step at a time, RequestOutputs out (vLLM's API).

    add_request -> Scheduler.schedule -> LoRAManager.activate -> ModelRunner.run
                -> Sampler -> detokenize, check stops -> RequestOutput

A step is one forward over the running sequences' next tokens and the newly admitted
prompts together (Scheduler: a mixed step).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from loraplex import envs
from loraplex.config import EngineConfig, PoolerConfig, kv_cache_dtype
from loraplex.engine.arg_utils import EngineArgs
from loraplex.engine.block_manager import BlockManager
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.draft_model import load_draft_model, make_draft
from loraplex.engine.eagle import EagleProposer, load_eagle_head, make_eagle
from loraplex.engine.generation_config import GenerationDefaults
from loraplex.engine.images import ImageInputs, build_vision
from loraplex.engine.logits_processors import LogitsProcessorBatch, load_logits_processors
from loraplex.engine.mistral_tokenizer import MistralTokenizer, resolve_tokenizer_mode
from loraplex.engine.multimodal_processor import MultimodalProcessor
from loraplex.engine.multimodal_prompt import (
    MultimodalPrompts,
    default_mm_lora,
    encoder_config,
    load_processor,
)
from loraplex.engine.prompt_embeds import (
    NOT_ENABLED,
    PLACEHOLDER_ID,
    checked_prompt_embeds,
    prompt_embeds_inputs,
)
from loraplex.engine.request import Request
from loraplex.engine.scheduler import ScheduledBatch, Scheduler
from loraplex.engine.sequence import Sequence
from loraplex.engine.spec_decode import Drafter, SpecDecodeLogger, SpecDecodeStats
from loraplex.engine.structured_output import StructuredOutputs
from loraplex.inputs import PromptType
from loraplex.layers.classifier import ClassifierHead, read_adapter_head
from loraplex.layers.classifier_activation import classify_activation, score_activation
from loraplex.layers.pooler import PoolingState, embedding_head
from loraplex.layers.quantization import read_side_config
from loraplex.layers.sampler import Sampler, SamplerOutput, SamplingRow
from loraplex.lora.adapter import PackedLoRA, local_adapter_dir
from loraplex.lora.errors import LoRAError
from loraplex.lora.manager import LoRACacheStats, LoRAManager
from loraplex.lora.request import LoRARequest
from loraplex.models.gguf_loader import (
    gguf_config,
    gguf_file,
    gguf_tokenizer,
    iterate_gguf_weights,
    log_dequantized_size,
)
from loraplex.models.hf_overrides import apply_hf_overrides, parse_hf_overrides
from loraplex.models.llava import VisionWeights
from loraplex.models.lm_head_classifier import LMHeadClassifier
from loraplex.models.loader import init_dummy_weights, load_weights, resolve_model_path
from loraplex.models.mamba_hybrid import has_mamba_layers
from loraplex.models.mistral_format import (
    MistralFormat,
    iterate_mistral_weights,
    mistral_config,
)
from loraplex.models.pooling_defaults import resolve_pooler_config
from loraplex.models.registry import (
    architecture,
    build_model,
    is_headless,
)
from loraplex.models.text_only import text_only_config
from loraplex.models.whisper import WhisperConfig, is_whisper, serving_config
from loraplex.outputs import PoolingRequestOutput, RequestOutput
from loraplex.pooling_params import PoolingParams
from loraplex.reasoning import REASONING_PARSERS, reasoning_ended, reasoning_opened
from loraplex.sampling_params import SamplingParams
from loraplex.worker.cpu_allocator import keep_freed_memory
from loraplex.worker.device import use_device
from loraplex.worker.memory import cpu_cache_config, kv_block_bytes, plan_memory
from loraplex.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# default_mm_loras' lora_int_ids start here, past the ids users and the server give
DEFAULT_MM_LORA_IDS = 1 << 30

# vLLM's prompt-dict keys beyond prompt / prompt_token_ids that the engine accepts:
# cache_salt (prefix-cache isolation); multi_modal_data {"image": ...} on a model that takes
# images (and Qwen-VL videos), else only while empty, as multi_modal_uuids; mm_processor_kwargs
# (the options of the model's processor for its multi_modal_data, over the engine's: a key
# it does not take is refused, engine/multimodal_prompt.py). Any other key (prompt_embeds,
# token_type_ids, a typo) is refused: it would be silently ignored otherwise.
_PROMPT_KEYS = {"prompt", "prompt_token_ids", "prompt_embeds", "cache_salt", "mm_processor_kwargs",
                "multi_modal_data", "multi_modal_uuids"}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    running_lora_names: list[str]
    waiting_lora_names: list[str]
    max_loras: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    # prefix caching, cumulative: prompt tokens looked up at admission, and found cached
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # adapter tiers (zeros with LoRA off): how many are registered / in host memory /
    # in device slots / being read now, and the cumulative cache counters
    num_registered_loras: int = 0
    num_host_loras: int = 0
    num_slot_loras: int = 0
    num_loading_loras: int = 0
    lora_cache: LoRACacheStats | None = None
    lora_load_seconds: list[float] = field(default_factory=list)  # loads since last call
    # speculative decoding, cumulative (None: off)
    spec_decode: SpecDecodeStats | None = None


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        # a GGUF file: config, tokenizer and weights from it (models/gguf_loader.py)
        self.gguf = gguf_file(args.model, args.load_format, args.revision)
        path = self.gguf or resolve_model_path(args.model, args.revision)
        # Mistral's own format: params.json, consolidated*.safetensors (mistral_format.py)
        self.mistral_format = MistralFormat() if self.gguf else MistralFormat.resolve(
            path, args.config_format, args.load_format)
        hf_config = gguf_config(path) if self.gguf else mistral_config(path) \
            if self.mistral_format.config else AutoConfig.from_pretrained(path)
        apply_hf_overrides(hf_config, parse_hf_overrides(args.hf_overrides))
        read_side_config(hf_config, path)  # older GPTQ / AWQ checkpoints
        whole = hf_config
        hf_config, self.text_only = text_only_config(hf_config, path)  # Gemma 3 4B+: text model
        if is_whisper(hf_config):  # its decoder's positions are max_model_len's limit
            hf_config = serving_config(hf_config)
        architecture(hf_config)
        # a causal LM served as a reranker: its head from lm_head rows (hf_overrides)
        self.lm_head_classifier = LMHeadClassifier.from_config(hf_config)
        self.config: EngineConfig = args.create_engine_config(hf_config)
        self.model_config = self.config.model_config
        # custom logits processors: imported now, so a bad name fails before the model loads
        logits_processor_classes = load_logits_processors(
            args.logits_processors, self.config.model_config.runner,
            self.config.speculative_config is not None)
        self.lora_config = self.config.lora_config
        self.multimodal = self.config.multimodal_config
        # the vision tower / audio encoder's config; None: text only (also when
        # limit_mm_per_prompt allows none of its inputs: the encoder never built)
        vision = encoder_config(whole, self.text_only, self.multimodal, args.model)
        mc = self.model_config
        self.classify = mc.pooling_task == "classify"
        self.activations: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if self.classify:  # HF's classifiers: the last token, its hidden state as it is
            asked = mc.pooler_config
            if asked is not None and (asked.pooling_type not in (None, "LAST")
                                      or asked.normalize or asked.dimensions):
                raise ValueError("a classifier pools its last token, unnormalized: "
                                 "pooler_config cannot change that")
            mc.pooler_config = PoolerConfig(pooling_type="LAST", normalize=False)
            self.activations = {"classify": classify_activation(hf_config),
                                "score": score_activation(hf_config)}
        elif self.lm_head_classifier is not None:
            raise ValueError("classifier_from_token makes a classifier's head: hf_overrides' "
                             "architectures must name a *ForSequenceClassification one "
                             f"(not {hf_config.architectures}) and the runner be pooling")
        elif mc.runner == "pooling":  # the user's fields over the checkpoint's defaults
            mc.pooler_config = resolve_pooler_config(path, mc.pooler_config)
            self.check_dimensions(mc.pooler_config.dimensions, hf_config.hidden_size)
        # a converted causal LM keeps its lm_head (the head's rows come from it)
        self.headless = is_headless(hf_config) and self.lm_head_classifier is None
        # a cross-encoder's pair: text_pair (true), or the two texts concatenated (vLLM)
        self.use_pad_token = bool(getattr(hf_config, "use_pad_token", True))
        use_device(mc.device)
        torch.manual_seed(mc.seed)
        if mc.device.type == "cpu" and envs.LORAPLEX_CPU_KEEP_FREED_MEMORY:
            keep_freed_memory()
        self._tokenizer_source = (path if args.tokenizer is None
                                  else resolve_model_path(args.tokenizer), args.tokenizer_revision)
        self.tokenizer_mode = "hf" if self.gguf and args.tokenizer is None else \
            resolve_tokenizer_mode(args.tokenizer_mode, self._tokenizer_source[0])
        self.tokenizer = self.load_tokenizer()
        # the model's processor of multi_modal_data (engine/multimodal_prompt.py)
        processor = load_processor(path, vision, self.tokenizer)
        self.vision = (self._build(lambda: build_vision(vision))
                       if processor is not None else None)
        if is_whisper(hf_config):  # engine/whisper_inputs.py; its encoder is in the model
            self._check_whisper()
            processor = load_processor(path, WhisperConfig.from_hf(hf_config), self.tokenizer)
        self.mm_prompts = MultimodalPrompts(processor, self.multimodal, self.tokenizer)
        self._check_hybrid(hf_config)
        self.id2label = {int(k): str(v) for k, v in
                         (getattr(hf_config, "id2label", None) or {}).items()}
        self.classifier_head: ClassifierHead | None = None  # the base's (classify)
        self.pad_token_id: int | None = getattr(hf_config, "pad_token_id", None)
        # (lora_int_id, registration) -> the adapter's own head, or None: the base's
        self._adapter_heads: dict[tuple[int, int], ClassifierHead | None] = {}
        self.model = self._load_model(hf_config, path)
        self.lora_manager = (LoRAManager(self.model, self.lora_config, mc.dtype,
                                         classifier_heads=self.classify,
                                         tower=self._lora_tower())
                             if self.lora_config else None)
        block_size = self.config.cache_config.block_size
        kv_dtype = kv_cache_dtype(self.config.cache_config.cache_dtype, mc.dtype)
        self.memory = plan_memory(self.lora_manager, kv_block_bytes(self.model, kv_dtype,
                                                                    block_size),
                                  block_size, mc.max_model_len, kv_dtype)
        cache_config = cpu_cache_config(self.config.cache_config, self.memory, mc.device.type)
        lm = self.lora_manager
        spec = self.config.speculative_config
        # a draft model (speculative decoding): loaded before the KV cache is sized, so
        # its weights and its cache come out of the same budget (worker/memory.py)
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
        self.model_runner = ModelRunner(self.model, mc, cache_config,
                                        self.config.scheduler_config,
                                        lm.eager_slots if lm else None,
                                        lm.rope_offsets if lm else None, self.vision,
                                        spec.num_speculative_tokens if spec else 0,
                                        self.memory.draft_kv_block_bytes)
        self.memory.num_kv_blocks = self.model_runner.num_blocks
        if self.model_runner.max_num_seqs < self.config.scheduler_config.max_num_seqs:
            # no more running sequences than their encoder K/V (Whisper) or Mamba state
            # (a hybrid) fit beside their KV cache (ModelRunner._reserve_per_sequence)
            self.config.scheduler_config = replace(self.config.scheduler_config,
                                                   max_num_seqs=self.model_runner.max_num_seqs)
        if self.model_runner.num_blocks * block_size < mc.max_model_len:
            slots = (f" after the adapter slots took {self.memory.lora_slot_bytes / 2**20:.1f} "
                     "MiB (lower max_loras or max_lora_rank)" if self.lora_manager else "")
            raise ValueError(
                f"the KV cache holds {self.model_runner.num_blocks * block_size} tokens{slots}, "
                f"fewer than max_model_len={mc.max_model_len}; give it more memory or lower "
                "max_model_len")
        lc = self.lora_config
        logger.info("memory: %s", self.memory.describe(lc.max_lora_rank, lc.max_cpu_loras)
                    if lc else self.memory.describe(0))
        self.block_manager = BlockManager(self.model_runner.num_blocks, block_size,
                                          self.config.cache_config.enable_prefix_caching)
        # speculative decoding: drafts per decoding sequence (ngram, or the draft model
        # with its own KV cache of as many blocks), their counters
        make = make_draft if spec and spec.method == "draft_model" else make_eagle
        self.draft = (make(draft_model, mc, self.config.cache_config,
                           self.config.scheduler_config, spec, self.model_runner.num_blocks)
                      if draft_model is not None else None)
        if isinstance(self.draft, EagleProposer):  # the target's features feed the head
            self.model_runner.feature_sink = self.draft.observe
        self.drafter = Drafter(spec, mc.max_model_len, self.draft) if spec else None
        self.spec_stats = SpecDecodeStats() if spec else None
        self.spec_logger = SpecDecodeLogger() if spec else None
        self.scheduler = Scheduler(
            self.config.scheduler_config, self.block_manager,
            lm.num_unpinned_capacity if lm else None,
            **({"lora_ready": lm.is_ready, "lora_pinned": lm.pinned.__contains__} if lm else {}),
            propose=self.drafter.propose_all if self.drafter else None,
            release=self.draft.release if self.draft else self.model_runner.release_state)
        # generation_config.json: the ids that end a turn, the authors' sampling defaults
        self.generation_defaults = GenerationDefaults.read(path, mc.generation_config)
        eos_ids: set[int] = set(self.generation_defaults.eos_token_ids)
        for eos in (self.tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
            eos_ids.update([eos] if isinstance(eos, int) else eos or [])
        self.eos_token_ids = eos_ids
        self.sampler = Sampler(eos_ids)
        self.logits_processors = (LogitsProcessorBatch(logits_processor_classes, self.config,
                                                       mc.device)
                                  if logits_processor_classes else None)
        self.structured = StructuredOutputs(self.tokenizer, self.model.args.vocab_size)
        # a reasoning model: its tag ids, so structured outputs start after the reasoning
        self.reasoning = (REASONING_PARSERS[mc.reasoning_parser] if mc.reasoning_parser
                          else None)
        self.reasoning_tags = self.reasoning.tag_ids(self.tokenizer) if self.reasoning \
            else None
        self.requests: dict[str, Request] = {}
        self._pending_lora_removal: set[int] = set()
        self.default_mm_loras = self._default_mm_loras()
        if self.modalities == ("audio",) and "audio" not in self.default_mm_loras \
                and getattr(whole, "has_lora_adapter", False):
            logger.warning("%s ships a LoRA adapter for its audio inputs (has_lora_adapter): "
                           "without default_mm_loras={'audio': <the model>} (and enable_lora) "
                           "audio requests run on the base model", args.model)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

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
        """A hybrid model (Mamba2 mixers, gated DeltaNets: their state is per sequence, not
        per token): speculative decoding refused; prefix caching turned off (a cached
        prefix has no state to start from), so n > 1 siblings each run their own prefill.
        (Granite 4.0's attention-only -micro, in the same class, is no hybrid.)"""
        if not has_mamba_layers(hf_config, architecture(hf_config)):
            return
        if self.config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for hybrid models (Mamba2, "
                             "gated DeltaNet: their recurrent state cannot roll back rejected "
                             "drafts)")
        if self.config.cache_config.enable_prefix_caching:
            logger.info("prefix caching is off for hybrid models (a cached prefix holds no "
                        "Mamba2 / DeltaNet state to resume from)")
            self.config.cache_config = replace(self.config.cache_config,
                                               enable_prefix_caching=False)

    def _check_whisper(self) -> None:
        """What Whisper is not served with, refused at start."""
        if self.config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported for Whisper "
                             "(an encoder-decoder model)")
        if self.model_config.runner == "pooling":
            raise ValueError("Whisper runs as a generate model, not a pooling one")

    def _default_mm_loras(self) -> dict[str, LoRARequest]:
        """default_mm_loras as registered adapters, named by their modality; their ids
        are vLLM's (the modality's place in sorted order + 1) moved past any id a user
        or the server picks (DEFAULT_MM_LORA_IDS), so they never collide."""
        asked = self.multimodal.default_loras
        for modality in asked:
            if modality not in self.modalities:
                raise ValueError(f"default_mm_loras: {self.model_config.name!r} takes no "
                                 f"{modality} inputs")
        loras = {m: LoRARequest(m, DEFAULT_MM_LORA_IDS + i, asked[m])
                 for i, m in enumerate(sorted(asked), start=1)}
        for req in loras.values():
            self.register_lora(req, fetch_hub=True)
        return loras

    @property
    def image_processor(self) -> MultimodalProcessor | None:
        """The model's processor of multi_modal_data (engine/multimodal_processor.py); None
        when it takes none."""
        return self.mm_prompts.processor

    @property
    def modalities(self) -> tuple[str, ...]:
        """What multi_modal_data may carry here (images, Qwen-VL's videos, audio)."""
        return self.mm_prompts.modalities

    @property
    def image_placeholder(self) -> str | None:
        """The image token's text (LLaVA's `<image>`); None: the model takes no images."""
        return self.mm_prompts.placeholder("image")

    @property
    def video_placeholder(self) -> str | None:
        """The video token's text (`<|video_pad|>`); None: the model takes no videos."""
        return self.mm_prompts.placeholder("video")

    @property
    def audio_placeholder(self) -> str | None:
        """What a chat puts where a clip goes (Granite Speech's `<|audio|>`; Qwen2-Audio's
        `Audio {i}: <|audio_bos|><|AUDIO|><|audio_eos|>`, {i} the clip's number in the
        conversation); None: the model takes no audio, or not in a chat (Whisper)."""
        return self.mm_prompts.placeholder("audio")

    @property
    def mistral_audio_rate(self) -> int | None:
        """Voxtral under tokenizer_mode "mistral": the rate its chat clips go to
        mistral_common at (entrypoints/chat_images.py); None otherwise."""
        return self.mm_prompts.mistral_audio_rate

    def data_keys(self, inputs: ImageInputs) -> list[str]:
        """multi_modal_data's keys for processed inputs (default_mm_loras go by them)."""
        return self.mm_prompts.data_keys(inputs)

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
            if self.classify:  # a random head of the config's shape, as the decoder's
                gen = torch.Generator().manual_seed(mc.seed + 2)
                self.classifier_head = ClassifierHead(0.02 * torch.randn(
                    hf_config.num_labels, hf_config.hidden_size, generator=gen))
        elif self.lm_head_classifier is not None:
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
                self.classifier_head = ClassifierHead.from_tensors(heads, path)
                if self.classifier_head is None:
                    raise ValueError(f"{path}: a classifier checkpoint without score.weight")
                if self.classifier_head.num_labels != len(self.id2label):
                    self.id2label = {}  # labels unnamed: their indices (see label())
        if self.lm_head_classifier is not None:
            self.classifier_head = self._lm_head_classifier(model)
        if self.vision is not None:
            self.vision.eval()
        return model.eval()

    def _lm_head_classifier(self, model: Any) -> ClassifierHead:
        """A converted causal LM's head (models/lm_head_classifier.py) from its lm_head
        weight (the embedding's when tied), tokens looked up in the tokenizer."""
        assert self.lm_head_classifier is not None
        weight = getattr(model.lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 \
                or not weight.dtype.is_floating_point or weight.element_size() < 2:
            raise ValueError("classifier_from_token needs a plain (unquantized) lm_head")
        return self.lm_head_classifier.head(weight, self.tokenizer.get_vocab())

    # ---- requests ---------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType, tokenizer: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            self.mm_prompts.check_counts(prompt)
            _check_prompt_keys(prompt, self.model_config.name, self.image_processor is not None)
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"], tokenizer)
            if "prompt_embeds" in prompt:  # (generation takes them before this)
                raise ValueError("prompt_embeds: supported for generation, not pooling")
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}: give a str, "
                         "a list of token ids or {'prompt_token_ids': [...]}")

    def _prompt_embeds(self, prompt: dict[str, Any], params: SamplingParams
                       ) -> tuple[list[int], ImageInputs]:
        """vLLM's EmbedsPrompt (engine/prompt_embeds.py): its placeholder ids and its
        rows' embeddings, truncated as truncate_prompt_tokens asks."""
        if not self.model_config.enable_prompt_embeds:
            raise ValueError(NOT_ENABLED)
        other = sorted(set(prompt) - {"prompt_embeds", "cache_salt"})
        if other:
            raise ValueError(f"a prompt with prompt_embeds takes only 'cache_salt' beside "
                             f"them, got {', '.join(map(repr, other))}")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not available for prompt_embeds (the prompt "
                             "has no token ids to score)")
        tensor = checked_prompt_embeds(prompt["prompt_embeds"], self.model.args.hidden_size)
        mc = self.model_config
        tensor = params.truncate_prompt(tensor, mc.max_model_len)
        scale = self.model.model.given_embeds_scale(mc.dtype)  # as HF's model scales them
        return [PLACEHOLDER_ID] * tensor.shape[0], prompt_embeds_inputs(
            tensor * scale if scale != 1.0 else tensor, mc.device, mc.dtype)

    def _check_prompt(self, ids: list[int], vocab: int) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        self._check_token_ids("prompt", ids, vocab)
        limit = self.model_config.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {limit}:"
                             " shorten the prompt or raise max_model_len")

    def _check_token_ids(self, field: str, ids: Iterable[int], vocab: int) -> None:
        """Ids inside the vocabulary (the base's, plus the tokens the request's adapter
        adds); the error names the request's field first."""
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{field} token id {bad[0]} is out of range [0, {vocab})")

    def _check_logprobs(self, params: SamplingParams) -> None:
        limit = self.model_config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and limit >= 0 and n > limit:
                raise ValueError(f"{name} must be <= max_logprobs ({limit}), got {n}: start "
                                 "the engine with a larger max_logprobs (-1: no limit)")

    def check_dimensions(self, dimensions: int | None, hidden_size: int | None = None
                         ) -> None:
        """vLLM's matryoshka rule: other output dimensions only on a model trained for
        them (config.json's is_matryoshka / matryoshka_dimensions), within its size."""
        if dimensions is None:
            return
        mc = self.model_config
        hidden_size = hidden_size or self.model.args.hidden_size
        if not mc.is_matryoshka:
            raise ValueError(f'dimensions: model "{mc.name}" does not support matryoshka '
                             "representation, changing output dimensions will lead to poor "
                             "results.")
        if mc.matryoshka_dimensions and dimensions not in mc.matryoshka_dimensions:
            raise ValueError(f'dimensions: model "{mc.name}" only supports '
                             f"{list(mc.matryoshka_dimensions)} matryoshka dimensions, got "
                             f"{dimensions}")
        if not 1 <= dimensions <= hidden_size:
            raise ValueError(f"dimensions must be in [1, {hidden_size}] (the model's hidden "
                             f"size), got {dimensions}")

    def _check_runner(self, params: SamplingParams | PoolingParams) -> None:
        """A generate runner takes SamplingParams, a pooling runner PoolingParams (vLLM
        refuses the other kind as clearly)."""
        runner = self.model_config.runner
        if runner == "pooling" and not isinstance(params, PoolingParams):
            raise ValueError("generation is only supported for generative models: this "
                             "engine runs runner='pooling' (use LLM.embed / /v1/embeddings, "
                             "or start it with runner='generate')")
        if runner == "generate" and isinstance(params, PoolingParams):
            raise ValueError("embeddings are only supported for pooling models: start the "
                             "engine with runner='pooling' (vLLM's task='embed')")

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | PoolingParams | None = None,
                    lora_request: LoRARequest | None = None, priority: int = 0) -> None:
        """Queue a request: SamplingParams on a generate runner, PoolingParams on a pooling
        one. Raises ValueError (LoRAError for a bad adapter); nothing is queued then.
        `priority`: lower is served earlier, under the priority scheduling policy only
        (vLLM's)."""
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if priority != 0 and self.config.scheduler_config.policy != "priority":
            raise ValueError(f"Got priority {priority} but Priority scheduling is not "
                             "enabled.")  # vLLM's words
        if params is None:
            params = PoolingParams() if self.model_config.runner == "pooling" \
                else SamplingParams()
        self._check_runner(params)
        if isinstance(params, PoolingParams):
            self._add_pooling_request(request_id, prompt, params, lora_request, priority)
            return
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = self.mm_prompts.request_prompt(prompt)  # (Whisper's forms as one dict)
        lora_request = lora_request or default_mm_lora(prompt, self.default_mm_loras)
        # the adapter first: one that adds tokens brings its own tokenizer
        lora_id = self._use_lora(lora_request) if lora_request is not None else 0
        tokenizer, vocab = self.get_tokenizer(lora_request), self.vocab_size(lora_request)
        embedded = isinstance(prompt, dict) and "prompt_embeds" in prompt
        if embedded:
            text, ids, images = None, *self._prompt_embeds(prompt, params)
        else:
            text, ids = self._tokenize(prompt, tokenizer)
            ids, images = self.mm_prompts.inputs(prompt, ids, self.config.scheduler_config)
        n_ids = len(ids)
        ids = params.truncate_prompt(ids, self.model_config.max_model_len)
        if images is not None and len(ids) != n_ids:
            raise ValueError("truncate_prompt_tokens would cut a prompt with images: leave "
                             "it unset for image requests")
        salt = _cache_salt(prompt)
        self._check_prompt(ids, vocab)
        self._check_token_ids("logit_bias", params.logit_bias or {}, vocab)
        self._check_token_ids("allowed_token_ids", params.allowed_token_ids or [], vocab)
        self._check_logprobs(params)
        if self.logits_processors is not None:
            self.logits_processors.validate(params)
        bad_words = bad_words_token_ids(params.bad_words, tokenizer)
        grammars = (self.structured.matchers(params.structured_outputs, params.n,
                                             self._reasoning(ids))
                    if params.structured_outputs else [None] * params.n)
        seqs, detoks = [], []
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.model_config.device)
                gen.manual_seed(params.seed + i)
            seq = Sequence(request_id, i, ids, params, lora_id, gen, priority)
            seq.grammar = grammars[i]
            seq.images = images
            seq.bad_words_token_ids = bad_words
            # cached K/V are shared only under the very same adapter weights, and salt
            registration = self.lora_manager.registration_of(lora_id) if lora_id else 0
            seq.cache_salt = registration.to_bytes(8, "little") + salt
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(tokenizer, [] if embedded else ids, params))
        self.requests[request_id] = Request(request_id, text, ids, params, lora_request, seqs,
                                            detoks, prompt_embedded=embedded)
        for seq in seqs:
            self.scheduler.add(seq)

    def _add_pooling_request(self, request_id: str, prompt: PromptType,
                             params: PoolingParams, lora_request: LoRARequest | None,
                             priority: int) -> None:
        """One prefill-only sequence that pools its prompt's hidden states."""
        if self.classify and params.normalize:  # not silently ignored
            raise ValueError("normalize: a classifier's output is its class probabilities; "
                             "there is no embedding to normalize")
        self.check_dimensions(params.dimensions)
        lora_id = self._use_lora(lora_request) if lora_request is not None else 0
        text, ids = self._tokenize(prompt, self.get_tokenizer(lora_request))
        ids = params.truncate_prompt(ids, self.model_config.max_model_len)
        _cache_salt(prompt)  # checked; pooling takes nothing from the prefix cache
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            raise ValueError("multi_modal_data: image inputs are not supported for pooling")
        self._check_prompt(ids, self.vocab_size(lora_request))
        seq = Sequence(request_id, 0, ids, params, lora_id, None, priority)
        seq.pooling = PoolingState(self.model_config.pooler_config.pooling_type,
                                   self._classified_position(ids) if self.classify else None)
        if self.classify:  # read now: a bad head fails this request alone
            self._head_of(lora_request)
        self.requests[request_id] = Request(request_id, text, ids, params, lora_request,
                                            [seq], [])
        self.scheduler.add(seq)

    def _finish_pooling(self, prefill: list[Sequence], touched: dict[str, Request]) -> None:
        """Pooling sequences whose prompt is all computed: their embedding, and done."""
        pc = self.model_config.pooler_config
        for seq in prefill:
            if seq.pooling is None or seq.num_computed_tokens < seq.num_tokens:
                continue
            req = self.requests[seq.request_id]
            p = req.params
            if self.classify:
                logits = self._head_of(req.lora_request).logits(seq.pooling.pooled())
                req.pooled = self.activations[
                    "score" if p.task == "score" else "classify"](logits)
            else:
                req.pooled = embedding_head(
                    seq.pooling.pooled(), pc.normalize if p.normalize is None else p.normalize,
                    p.dimensions if p.dimensions is not None else pc.dimensions)
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
            touched[req.request_id] = req

    def _classified_position(self, ids: list[int]) -> int:
        """HF's classifiers score the last token that is not config.json's pad_token_id
        (the first when all are), so a prompt ending in it is scored as HF does. A
        converted causal LM scores the last token, as the LM predicts the next one."""
        pad = None if self.lm_head_classifier is not None else self.pad_token_id
        return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad), 0) \
            if pad is not None else len(ids) - 1

    def _head_of(self, lora_request: LoRARequest | None) -> ClassifierHead:
        """The request's classifier head: its adapter's own (modules_to_save score /
        classifier, read once per registration into host memory), else the base's."""
        assert self.classifier_head is not None, "not a classifier"
        if lora_request is None or self.lora_manager is None:
            return self.classifier_head
        lid = lora_request.lora_int_id
        key = (lid, self.lora_manager.registration_of(lid))
        if key not in self._adapter_heads:
            for old in [k for k in self._adapter_heads if k[0] == lid]:
                del self._adapter_heads[old]  # an earlier registration of this id
            self._adapter_heads[key] = read_adapter_head(
                self.lora_manager.registered[lid], self.classifier_head)
        return self._adapter_heads[key] or self.classifier_head

    def check_score(self) -> None:
        """vLLM's refusal of scores from a classifier of several labels (a cross-encoder
        has one: its score)."""
        if self.classify and self.classifier_head.num_labels != 1:
            raise ValueError("Score API is only enabled for num_labels == 1 (this "
                             f"classifier has {self.classifier_head.num_labels})")

    def label(self, index: int) -> str:
        """id2label of a class index (its index as text when the config names none)."""
        return self.id2label.get(index, str(index))

    def _use_lora(self, req: LoRARequest) -> int:
        if self.lora_manager is None:
            raise ValueError(f"request asks for LoRA adapter {req.lora_name!r} but LoRA is "
                             "not enabled: create the engine with enable_lora=True")
        self.register_lora(req)  # config only: the weights load off the step loop
        if req.lora_int_id not in self.lora_manager.pinned and \
                len(self.lora_manager.pinned) >= self.lora_config.max_loras:
            raise LoRAError(f"adapter {req.lora_name!r} cannot run: all max_loras="
                            f"{self.lora_config.max_loras} slots are pinned by other adapters")
        return req.lora_int_id

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self.requests.pop(str(rid), None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)
        self._collect_lora_removals()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def _reasoning(self, prompt_ids: list[int]) -> tuple[int, int, str] | None:
        """For structured outputs on a reasoning model: (start tag, end tag, the reply's
        first state: "constrained" when the prompt closed the reasoning, "reasoning" when it
        opened it, "undecided" when the reply may or may not open with the start tag
        (qwen3), else "reasoning")."""
        if self.reasoning_tags is None:
            return None
        start, end = self.reasoning_tags
        state = ("constrained" if reasoning_ended(prompt_ids, start, end) else
                 "reasoning" if reasoning_opened(prompt_ids, start, end) else
                 "undecided" if self.reasoning.opens_in_reply else "reasoning")
        return start, end, state

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        use_device(self.model_config.device)  # this thread may not be the constructor's
        touched: dict[str, Request] = {}
        manager = self.lora_manager
        if manager is not None:
            failed = manager.poll_loads()  # adapters read since the last step
            if failed:
                self._fail_lora_requests([], failed, touched)
        batch = self.scheduler.schedule()
        seqs = batch.seqs
        lora_slots = None
        if manager is not None:
            manager.prefetch(s.lora_int_id for s in self.scheduler.waiting if s.lora_int_id)
            if seqs:
                lora_slots, failed = manager.activate(
                    {s.lora_int_id for s in seqs if s.lora_int_id},
                    keep=self.scheduler.running_loras())
                if failed:
                    kept = set(self._fail_lora_requests(seqs, failed, touched))
                    batch = batch.keep(kept)
                    seqs = batch.seqs
            elif not touched and manager.loader.num_inflight:
                manager.loader.wait_any(timeout=0.05)  # only loads left to wait for
        if seqs:
            started = time.monotonic()
            for seq in batch.prefill:  # queue time ends when the forward starts
                req = self.requests[seq.request_id]
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = started
            prompt_positions = batch.prompt_logprob_positions
            logits, prompt_hidden, prompt_slots = self.model_runner.run(
                batch.prefill, batch.decode, lora_slots, batch.prefill_lens, prompt_positions,
                batch.spec, batch.spec_tokens)
            seqs = batch.sampled  # a prompt's earlier chunks give no token
            if prompt_positions:
                self._add_prompt_logprobs(prompt_positions, prompt_hidden, prompt_slots)
            batch.advance()
            for seq in batch.prefill + batch.decode:  # full blocks become shareable prefixes
                self.block_manager.commit(seq)
            self._finish_pooling(batch.prefill, touched)
            # the logits' rows: finished prompts, each verified sequence's last token and
            # drafts (one row per position, the output before it: penalties etc. per
            # position), then the decodes
            done = seqs[:len(seqs) - len(batch.decode)]
            seq_drafts = ([(s, []) for s in done] + list(zip(batch.spec, batch.spec_tokens))
                          + [(s, []) for s in batch.decode])
            rows, row_seqs, drafts = [], [], []
            for s, d in seq_drafts:
                out = s.output_token_ids
                rows += [SamplingRow(s.params, _scored_prompt(s), out + d[:j] if j else out,
                                     s.generator, s.bad_words_token_ids)
                         for j in range(len(d) + 1)]
                row_seqs += [s] * (len(d) + 1)
                drafts += d + [-1]
            if self.logits_processors is not None:  # (no drafts: one row per sequence)
                self.logits_processors.update(row_seqs)
            mask = (self.structured.token_mask([s.grammar for s in row_seqs])
                    if any(s.grammar is not None for s in row_seqs) else None)
            sampled = (self.sampler(logits, rows, mask, drafts if batch.spec else None,
                                    _draft_probs(seq_drafts, batch, logits),
                                    self.logits_processors)
                       if rows else None)
            now = time.monotonic()
            i = 0  # each sequence's first row
            for seq, d in seq_drafts:
                req = self.requests[seq.request_id]
                if req.first_token_time is None:
                    req.first_token_time = now
                if d:
                    self._emit_verified(req, seq, sampled, i, len(d))
                else:
                    self._append_token(req, seq, sampled.token_ids[i],
                                       sampled.token_logprobs[i], sampled.logprobs[i])
                i += len(d) + 1
                if not req.seqs[0].needs_prompt_logprobs:  # (n > 1: a sibling may be ahead)
                    touched[req.request_id] = req
            if self.spec_logger is not None:
                self.spec_logger.maybe_log(self.spec_stats)
        outputs = []
        for rid, req in touched.items():
            outputs.append(req.to_output())
            if req.finished:
                self.requests.pop(rid, None)
        self._collect_lora_removals()
        return outputs

    def _add_prompt_logprobs(self, positions: list[tuple[Sequence, range]],
                             hidden: torch.Tensor, slots: list[int] | None) -> None:
        """Entry p + 1 of each sequence's prompt logprobs from the logits at position p."""
        tokens = [seq.token_ids[p + 1] for seq, span in positions for p in span]
        ks = [seq.params.prompt_logprobs for seq, span in positions for _ in span]
        entries = []
        for logits in self.model_runner.prompt_logits(hidden, slots):
            n = len(entries)
            entries += self.sampler.token_logprobs(logits, tokens[n:n + logits.shape[0]],
                                                   ks[n:n + logits.shape[0]])
        it = iter(entries)
        for seq, span in positions:
            seq.prompt_logprobs.extend(next(it) for _ in span)

    def _fail_lora_requests(self, seqs: list[Sequence], failed: dict[int, LoRAError],
                            touched: dict[str, Request]) -> list[Sequence]:
        for seq in [s for s in self.scheduler.running + list(self.scheduler.waiting)
                    if s.lora_int_id in failed]:
            req = self.requests[seq.request_id]
            req.error = str(failed[seq.lora_int_id])
            seq.finish_reason = "error"
            self.scheduler.finish(seq)
            touched[req.request_id] = req
        logger.error("adapter(s) failed to load: %s", "; ".join(map(str, failed.values())))
        return [s for s in seqs if s.lora_int_id not in failed]

    def _emit_verified(self, req: Request, seq: Sequence, out: SamplerOutput, first: int,
                       num_drafts: int) -> None:
        """A verified sequence's tokens: rows first..first + num_drafts of `out` hold the
        token after its last one and after each draft; the accepted drafts and the token
        after them are appended one at a time, exactly as that many decode steps would
        (each advances the cache by the token before it and commits full blocks; a stop,
        eos or max_tokens ends the run there). The K/V of rejected drafts stay behind the
        sequence's length, never read, and their blocks go back (BlockManager.trim)."""
        accepted = 0
        while accepted < num_drafts and out.accepted[first + accepted]:
            accepted += 1
        self.spec_stats.observe(num_drafts, accepted)
        for r in range(first, first + accepted + 1):
            seq.num_computed_tokens += 1  # the token before row r's is in the cache now
            self.block_manager.commit(seq)
            self._append_token(req, seq, out.token_ids[r], out.token_logprobs[r],
                               out.logprobs[r])
            if seq.is_finished:
                return
        self.block_manager.trim(seq)

    def _append_token(self, req: Request, seq: Sequence, token: int, token_logprob: float,
                      logprobs: dict | None) -> None:
        seq.append_token(token)
        if seq.grammar is not None:
            seq.grammar.accept_token(token)  # the mask allowed only tokens it accepts
        seq.cumulative_logprob += token_logprob
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        n_out = seq.num_output_tokens
        detok = req.detokenizers[seq.index]
        can_stop = n_out >= p.min_tokens
        if can_stop and not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif can_stop and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            detok.append(token)
            hit = detok.stop_string_hit() if can_stop else None
            if hit is not None:
                seq.finish_reason, seq.stop_reason = "stop", hit
            elif (p.max_tokens is not None and n_out >= p.max_tokens) or \
                    seq.num_tokens >= self.model_config.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is None and seq.grammar is not None and seq.grammar.is_terminated():
            seq.finish_reason = "stop"  # the grammar is complete (its stop token taken)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    # ---- adapters ---------------------------------------------------------------------
    def _require_lora(self) -> LoRAManager:
        if self.lora_manager is None:
            raise ValueError("LoRA is not enabled: create the engine with enable_lora=True")
        return self.lora_manager

    def prepare_lora(self, lora_request: LoRARequest) -> PackedLoRA:
        """Read and validate an adapter (I/O only); safe to call from any thread."""
        return self._require_lora().prepare(lora_request)

    def prepare_lora_in_background(self, lora_request: LoRARequest) -> Future[PackedLoRA]:
        """prepare_lora on an adapter-loader thread, whose torch ops run single-threaded
        (worker/cpu_threads.py); the future raises what prepare_lora would."""
        return self._require_lora().loader.run(self.prepare_lora, lora_request)

    def register_lora(self, lora_request: LoRARequest, fetch_hub: bool = False) -> bool:
        """Make an adapter known without reading its weights (its config is checked);
        they are read off the step loop when a request first needs them. Cheap enough
        for thousands. False if this exact adapter is registered already.
        `fetch_hub`: a hub id not registered yet is fetched and read now, as add_lora
        does (the offline API, which waits anyway: only then is it known whether the
        adapter adds tokens, which its prompts must be encoded with)."""
        manager = self._require_lora()
        if fetch_hub and lora_request.lora_int_id not in manager.registered \
                and local_adapter_dir(lora_request) is None:
            return self.add_lora(lora_request)
        added = manager.register(lora_request)  # raises for another adapter on this id
        self._pending_lora_removal.discard(lora_request.lora_int_id)  # wanted again
        return added

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False (with a warning) while requests hold KV blocks."""
        if self.block_manager.reset_prefix_cache():
            return True
        logger.warning("the prefix cache was not reset: %d KV blocks are still held by "
                       "requests (reset when none runs)",
                       self.block_manager.num_blocks - self.block_manager.num_free_blocks)
        return False

    def add_lora(self, lora_request: LoRARequest, prepared: PackedLoRA | None = None) -> bool:
        """Register and load now, validating the weights too (vLLM's add_lora)."""
        manager = self._require_lora()
        added = manager.add(lora_request, prepared)  # raises for another adapter on this id
        self._pending_lora_removal.discard(lora_request.lora_int_id)  # wanted again
        return added

    def remove_lora(self, lora_int_id: int) -> bool:
        """Unregister; requests already running on it finish on its weights first."""
        manager = self._require_lora()
        if lora_int_id not in manager.registered:
            return False
        if any(s.lora_int_id == lora_int_id for r in self.requests.values() for s in r.seqs
               if not s.is_finished):
            self._pending_lora_removal.add(lora_int_id)
            return True
        return manager.remove(lora_int_id)

    def _collect_lora_removals(self) -> None:
        if not self._pending_lora_removal:
            return
        busy = {s.lora_int_id for r in self.requests.values() for s in r.seqs
                if not s.is_finished}
        for lora_id in list(self._pending_lora_removal - busy):
            self._pending_lora_removal.discard(lora_id)
            self.lora_manager.remove(lora_id)

    def list_loras(self) -> set[int]:
        if self.lora_manager is None:
            return set()
        return set(self.lora_manager.registered) - self._pending_lora_removal

    def list_registered_loras(self) -> set[int]:
        """list_loras and the adapters whose removal waits for their requests: the ids
        whose files the engine may still read."""
        return set(self.lora_manager.registered) if self.lora_manager is not None else set()

    def has_lora(self, lora_int_id: int) -> bool:
        """``lora_int_id in list_loras()`` without building the set of every registered
        id (thousands of them) for each request."""
        return (self.lora_manager is not None and lora_int_id in self.lora_manager.registered
                and lora_int_id not in self._pending_lora_removal)

    def pin_lora(self, lora_int_id: int) -> bool:
        return self._require_lora().pin(lora_int_id)

    def get_stats(self) -> EngineStats:
        def names(seqs: Iterable[Sequence]) -> list[str]:
            """The adapters' names, by distinct id: with thousands of requests queued
            this runs every step. An unfinished request's id stays registered
            (remove_lora defers), so the registry names them all."""
            ids = {s.lora_int_id for s in seqs} - {0, None}
            registered = self.lora_manager.registered if self.lora_manager else {}
            return sorted({registered[i].lora_name for i in ids if i in registered})

        lm = self.lora_manager
        lora = {}
        if lm is not None:
            lora = dict(num_registered_loras=len(lm.registered), num_host_loras=lm.num_host,
                        num_slot_loras=lm.num_slots_used,
                        num_loading_loras=lm.loader.num_inflight,
                        lora_cache=replace(lm.stats),
                        lora_load_seconds=lm.loader.drain_latencies())
        return EngineStats(
            **lora,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            running_lora_names=names(self.scheduler.running),
            waiting_lora_names=names(self.scheduler.waiting),
            max_loras=self.lora_config.max_loras if self.lora_config else 0,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_total_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.block_manager.num_query_tokens,
            prefix_cache_hits=self.block_manager.num_hit_tokens,
            spec_decode=self.spec_stats.copy() if self.spec_stats else None)

    def get_tokenizer(self, lora_request: LoRARequest | None = None):
        """The tokenizer of requests for `lora_request`: the adapter's own when it adds
        tokens to the vocabulary (registered), else the base model's."""
        if lora_request is None or self.lora_manager is None:
            return self.tokenizer
        return self.lora_manager.tokenizers.get(lora_request.lora_int_id, self.tokenizer)

    def vocab_size(self, lora_request: LoRARequest | None = None) -> int:
        """Token ids a request may use: the base's vocabulary, plus the tokens its adapter
        adds."""
        added = (self.lora_manager.added_token_counts.get(lora_request.lora_int_id, 0)
                 if lora_request is not None and self.lora_manager is not None else 0)
        return self.model.args.vocab_size + added


def bad_words_token_ids(words: list[str] | None, tokenizer: Any) -> list[list[int]]:
    """vLLM's rule: each word as the tokenizer encodes it alone and after a space (the
    second only when it is another token sequence of the same length)."""
    out: list[list[int]] = []
    for word in words or []:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out


def _check_prompt_keys(prompt: dict[str, Any], model: str, takes_images: bool) -> None:
    """Refuse what a prompt dict asks for that this engine cannot do (vLLM refuses
    multimodal input for a text-only model too), rather than ignore it."""
    if prompt.get("multi_modal_data") and not takes_images:
        raise ValueError(f"multi_modal_data: multimodal inputs are not supported yet by "
                         f"model {model!r}: it has no vision tower (image inputs are "
                         "served on LLaVA, Gemma 3, Llama 4, Qwen-VL and Mistral 3 models) "
                         "and no audio encoder (audio inputs: Granite Speech, Qwen2-Audio)")
    if prompt.get("multi_modal_uuids"):
        raise ValueError("multi_modal_uuids: multimodal inputs are not supported yet with "
                         "uuids (images are hashed for the prefix cache)")
    unknown = sorted(set(prompt) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompt key(s) {', '.join(map(repr, unknown))} are not supported "
                         "yet: a prompt dict takes 'prompt' or 'prompt_token_ids', and "
                         "'cache_salt'")


def _scored_prompt(seq: Sequence) -> list[int]:
    """The prompt tokens the repetition penalty sees: none for prompt_embeds (their ids
    are placeholders)."""
    return [] if seq.images is not None and seq.images.prompt_embeds else seq.prompt_token_ids


def _cache_salt(prompt: PromptType) -> bytes:
    """A prompt dict's cache_salt (vLLM's): requests share cached prefixes only with
    requests of the same salt, so one tenant cannot time another's prompts."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is None:
        return b""
    if not isinstance(salt, str) or not salt:
        raise ValueError("cache_salt must be a non-empty string")
    return salt.encode()


def _draft_probs(seq_drafts: list[tuple[Sequence, list[int]]], batch: ScheduledBatch,
                 logits: torch.Tensor) -> torch.Tensor | None:
    """[rows, logits' width] the draft model's distribution behind each sampled row's
    draft (zeros elsewhere: greedy and draftless rows ignore it), in the sampler's row
    order; None when no draft came with one (ngram, or only greedy requests)."""
    probs = dict(zip(batch.spec, batch.spec_probs))
    if all(q is None for q in probs.values()):
        return None
    out = logits.new_zeros(sum(len(d) + 1 for _, d in seq_drafts), logits.shape[1],
                           dtype=torch.float32)
    row = 0
    for seq, d in seq_drafts:
        q = probs.get(seq) if d else None
        if q is not None:
            width = min(q.shape[1], out.shape[1])
            out[row:row + len(d), :width] = q[:, :width]
        row += len(d) + 1
    return out

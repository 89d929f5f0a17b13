"""Configuration dataclasses. Each component copies out the fields it uses.

`EngineArgs` (in `engine/arg_utils.py`) is the user-facing flat bag of vLLM-named
options; `create_engine_config()` turns it into these validated pieces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplex.layers.quantization.config import QuantConfig

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, config_dtype: torch.dtype | None,
                  device: torch.device) -> torch.dtype:
    """`"auto"` = the checkpoint's dtype on GPU; on CPU half types are slow, so fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        if config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of: auto, "
                         + ", ".join(sorted(_DTYPES)))
    return _DTYPES[dtype]


# vLLM's --kv-cache-dtype: "auto" is the model's dtype; fp8 is e4m3 (vLLM's on CUDA)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def kv_cache_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the paged KV cache is stored in."""
    return KV_CACHE_DTYPES[cache_dtype] or model_dtype


POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("generate", "pooling")


@dataclass
class PoolerConfig:
    """vLLM's PoolerConfig: how a pooling runner turns a prompt's final hidden states
    (after the final norm) into one embedding. None fields take the checkpoint's
    sentence-transformers defaults (models/pooling_defaults.py), else LAST + normalize."""

    pooling_type: str | None = None  # "LAST" | "MEAN" | "CLS" (the first token)
    normalize: bool | None = None  # L2-normalize the embedding
    dimensions: int | None = None  # matryoshka: the default output size (truncated)

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            self.pooling_type = self.pooling_type.upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"pooling_type={self.pooling_type!r} is not supported; use "
                                 "one of: " + ", ".join(POOLING_TYPES))
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")

    @classmethod
    def from_json(cls, value: PoolerConfig | dict | str | None) -> PoolerConfig | None:
        """A PoolerConfig, a dict or a JSON string (the command line's); unknown keys
        are an error, not silently dropped."""
        import json

        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"pooler_config must be a JSON object, got {value!r}")
        known = {"pooling_type", "normalize", "dimensions"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"pooler_config: {', '.join(unknown)} not supported; the "
                             "fields are " + ", ".join(sorted(known)))
        return cls(**value)


@dataclass
class ModelConfig:
    model: str
    tokenizer: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    seed: int = 0
    load_format: str = "auto"  # "auto" | "dummy"
    revision: str | None = None
    served_model_name: str | None = None
    # CUDA graphs for decode (worker/cuda_graph.py): off with enforce_eager, never on CPU.
    # cuda_graph_sizes: None = the default sizes up to max_num_seqs; one value = the
    # default sizes up to it; several = exactly those (larger batches run eagerly)
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] | None = None
    quantization: QuantConfig | None = None  # the checkpoint's GPTQ / AWQ weights
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask (-1: any)
    enable_prompt_embeds: bool = False  # prompts may be given as embeddings (vLLM's)
    # the model thinks between tags (reasoning.py's REASONING_PARSERS): structured outputs
    # constrain only the reply after its reasoning; the server splits replies
    reasoning_parser: str | None = None
    # generation_config.json's eos ids and sampling defaults: "auto" (the model's), "vllm"
    # (none), or a folder (engine/generation_config.py)
    generation_config: str = "auto"
    # vLLM's runner: "generate" (next tokens) or "pooling" (one embedding per prompt);
    # pooling: its PoolerConfig (None fields resolved by the engine), and the matryoshka
    # dimensions the checkpoint allows (None: any up to hidden size when is_matryoshka)
    runner: str = "generate"
    pooler_config: PoolerConfig | None = None
    # pooling: "embed" (LLM.embed, /v1/embeddings) or "classify" (a
    # *ForSequenceClassification checkpoint: LLM.classify, /classify)
    pooling_task: str | None = None
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner={self.runner!r}: use one of " + ", ".join(RUNNERS))
        sizes = self.cuda_graph_sizes
        if sizes is not None and (not sizes or any(
                not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes)):
            raise ValueError(f"cuda_graph_sizes must be batch sizes >= 1, got {sizes!r}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass
class CacheConfig:
    block_size: int = 16
    # KV cache budget: explicit bytes wins; else gpu_memory_utilization on CUDA, or
    # cpu_kv_cache_gib on CPU.
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 2.0
    num_blocks_override: int | None = None  # vLLM's num_gpu_blocks_override
    # share the K/V of identical prompt prefixes (per adapter) between sequences
    enable_prefix_caching: bool = True
    # a hybrid model under prefix caching: how many copies of one sequence's whole
    # recurrent state (worker/state_snapshots.py) to keep, out of the KV cache's budget;
    # None: as many as max_num_seqs (those that fit); 0: none (no prefix is ever hit)
    mamba_state_snapshots: int | None = None
    # vLLM's kv_cache_dtype: "auto" (the model's dtype) or an FP8 type (KV_CACHE_DTYPES),
    # stored as value / scale (the checkpoint's per-layer k_scale / v_scale, else 1.0)
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.cache_dtype!r} is not supported; use one "
                             "of: " + ", ".join(KV_CACHE_DTYPES))
        if self.mamba_state_snapshots is not None and self.mamba_state_snapshots < 0:
            raise ValueError("mamba_state_snapshots must be >= 0, got "
                             f"{self.mamba_state_snapshots}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")


LORA_POLICIES = ("fair", "fcfs")
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192  # prompt tokens per step (decodes ride on top)
    max_model_len: int = 2048
    # split a prompt over steps when it does not fit the budget's remainder (vLLM v1)
    enable_chunked_prefill: bool = True
    # when more adapters are wanted than max_loras: "fair" lets requests for running
    # adapters go ahead of blocked ones and time-slices the slots (see scheduler.py);
    # "fcfs" admits strictly in arrival order.
    lora_policy: str = "fair"
    lora_min_slice_steps: int = 16  # steps an adapter keeps its slot before it must yield
    # vLLM's scheduling policy: "fcfs" queues by arrival; "priority" by each request's
    # priority (lower first), then arrival (see scheduler.py)
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.lora_policy not in LORA_POLICIES:
            raise ValueError(f"lora_scheduling_policy={self.lora_policy!r}: use one of "
                             + ", ".join(LORA_POLICIES))
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy={self.policy!r}: use one of "
                             + ", ".join(SCHEDULING_POLICIES))
        if self.lora_min_slice_steps < 0:
            raise ValueError("lora_min_slice_steps must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got "
                             f"{self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                f"max_model_len ({self.max_model_len}) with chunked prefill off: a long "
                "prompt could never run; raise max_num_batched_tokens, lower max_model_len "
                "or enable chunked prefill")


@dataclass
class LoRAConfig:
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: torch.dtype | None = None  # None = the model's dtype
    lora_extra_vocab_size: int = 0
    # rope tables for long-context LoRA (LongLoRA): an adapter whose context_length is f x
    # the base's max_position_embeddings needs f here
    long_lora_scaling_factors: tuple[float, ...] = ()
    num_load_workers: int = 2  # threads reading adapters off the step loop
    # the module names that get adapter slots (SGLang's --lora-target-modules); None: every
    # one the model supports
    target_modules: tuple[str, ...] | None = None
    # per-slot whole embed_tokens / lm_head tables for PEFT's modules_to_save (two
    # vocabulary tables per slot; off: such adapters are refused)
    modules_to_save: bool = False
    # vLLM's enable_tower_connector_lora: a multimodal model's tower and projector linears
    # get adapter slots too (lora/tower.py); off: an adapter's LoRA there is left out
    tower_connector_lora: bool = False

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")


# vLLM's speculative methods that need heads or other proposers: refused by name
_UNSUPPORTED_METHODS = ("medusa", "mlp_speculator", "mtp", "deepseek_mtp",
                        "ernie_mtp", "qwen3_next_mtp", "suffix")
# the keys each method takes (vLLM's names)
_NGRAM_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max",
               "prompt_lookup_min")
_DRAFT_KEYS = ("method", "model", "num_speculative_tokens", "draft_tensor_parallel_size",
               "quantization", "max_model_len", "revision")
_EAGLE_KEYS = ("method", "model", "num_speculative_tokens", "draft_tensor_parallel_size",
               "max_model_len", "revision")
# the methods whose proposer is a model loaded from `model`
_MODEL_METHODS = ("draft_model", "eagle", "eagle3")


@dataclass
class SpeculativeConfig:
    """vLLM's speculative_config, two methods. "ngram" (prompt lookup): each decoding
    sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
    looked up in its prompt + output, and the up to num_speculative_tokens that followed
    their most recent earlier occurrence are verified in one forward; nothing to load
    (engine/ngram_proposer.py). "draft_model": a small LLM of the same vocabulary
    (`model`) proposes them, k forwards of its own with its own KV cache
    (engine/draft_model.py); it runs without adapters. "eagle" / "eagle3": an EAGLE-1 or
    EAGLE-3 head (`model`) proposes them from the target's hidden states (engine/eagle.py,
    models/eagle.py); it runs without adapters too."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    method: str = "ngram"
    # draft_model: the draft's path or hub id, its revision, its quantization (None: the
    # checkpoint's own), and the positions it serves (None: the target's max_model_len)
    model: str | None = None
    revision: str | None = None
    quantization: str | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        k, lo, hi = self.num_speculative_tokens, self.prompt_lookup_min, self.prompt_lookup_max
        checks = [("num_speculative_tokens", k)]
        if self.method == "ngram":
            checks += [("prompt_lookup_min", lo), ("prompt_lookup_max", hi)]
        elif self.max_model_len is not None:
            checks.append(("max_model_len", self.max_model_len))
        for name, value in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an int >= 1, got "
                                 f"{value!r}")
        if self.method == "ngram" and lo > hi:
            raise ValueError(f"speculative_config: prompt_lookup_min ({lo}) must be <= "
                             f"prompt_lookup_max ({hi})")
        if self.method in _MODEL_METHODS and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"speculative_config: method {self.method!r} needs a 'model' "
                             "(the draft's or head's path or hub id)")

    @classmethod
    def from_dict(cls, spec: dict) -> SpeculativeConfig:
        """vLLM's dict: {"method": "ngram", "num_speculative_tokens": k,
        "prompt_lookup_max": n, "prompt_lookup_min": m} ("model": "[ngram]" names the
        method too, as in vLLM; a missing lookup bound takes the other's value, both
        missing: 5, vLLM's defaults), or {"model": "path-or-hub-id",
        "num_speculative_tokens": k} (method "draft_model", implied by a model), with
        vLLM's optional "revision", "quantization", "max_model_len" and
        "draft_tensor_parallel_size" (1 only); or {"method": "eagle" | "eagle3", "model":
        "path-or-hub-id of the head", "num_speculative_tokens": k} (with the optional
        "revision", "max_model_len", "draft_tensor_parallel_size")."""
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got "
                             f"{type(spec).__name__}")
        method, model = spec.get("method"), spec.get("model")
        if method is None and model in ("ngram", "[ngram]"):
            method = "ngram"
        elif method is None and model is not None:
            method = "draft_model"
        keys = (_DRAFT_KEYS if method == "draft_model" else
                _EAGLE_KEYS if method in ("eagle", "eagle3") else _NGRAM_KEYS)
        unknown = sorted(set(spec) - set(keys))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; "
                             f"method {method or 'ngram'!r} takes {', '.join(keys)}")
        if method in _UNSUPPORTED_METHODS:
            raise ValueError(f"speculative_config: method {method!r} is not supported: "
                             "loraplex only supports the 'ngram' (prompt lookup), 'draft_model', "
                             "'eagle' and 'eagle3' methods (no Medusa or MTP heads)")
        if method not in ("ngram", *_MODEL_METHODS):
            raise ValueError(f"speculative_config: unknown method {method!r}; the supported "
                             "methods are 'ngram', 'draft_model', 'eagle' and 'eagle3'")
        if "num_speculative_tokens" not in spec:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        k = spec["num_speculative_tokens"]
        if method in _MODEL_METHODS:
            tp = spec.get("draft_tensor_parallel_size")
            if tp not in (None, 1):
                raise ValueError(f"speculative_config: draft_tensor_parallel_size={tp!r}: "
                                 "loraplex runs the draft on one device (1)")
            return cls(num_speculative_tokens=k, method=method, model=model,
                       revision=spec.get("revision"), quantization=spec.get("quantization"),
                       max_model_len=spec.get("max_model_len"))
        if model not in (None, "ngram", "[ngram]"):
            raise ValueError(f"speculative_config: method 'ngram' takes no model, got "
                             f"{model!r}")
        lo, hi = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = 5
        return cls(num_speculative_tokens=k,
                   prompt_lookup_max=hi if hi is not None else lo,
                   prompt_lookup_min=lo if lo is not None else hi)


# the modalities vLLM's limit_mm_per_prompt and default_mm_loras name (loraplex's models
# take images, Qwen2-VL / Qwen2.5-VL videos too: a prompt's other kinds are refused
# whatever their limit)
MODALITIES = ("image", "video", "audio")
VIDEO_NUM_FRAMES = 32  # vLLM's VideoMediaIO: frames kept of a decoded video file


def json_object(name: str, value: dict | str | None, of: str = "") -> dict:
    """A dict option as given in Python (a dict) or on the command line (its JSON text);
    {} for None, a clear error for anything else. `of` says what its keys are."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (a JSON object){of}, got "
                         f"{type(value).__name__}")
    return value


def _json_dict(name: str, value: dict | str | None) -> dict:
    """A {modality: ...} option."""
    value = json_object(name, value, " of modalities")
    unknown = sorted(set(value) - set(MODALITIES))
    if unknown:
        raise ValueError(f"{name}: unknown modality {unknown[0]!r}; use "
                         + ", ".join(MODALITIES))
    return value


@dataclass
class MultiModalConfig:
    """What a prompt's multi_modal_data may carry, and what it brings (vLLM's options).

    `limit_per_prompt` (limit_mm_per_prompt): the most items of a modality one prompt may
    carry; a modality not named has no limit. {"image": 0} serves a multimodal checkpoint
    on text: its vision tower is never built, so it takes no memory (Qwen2-VL /
    Qwen2.5-VL, whose tower embeds videos too: {"image": 0, "video": 0}).
    `default_loras` (default_mm_loras): the adapter a prompt with that modality's data runs
    under when the request names none (a checkpoint whose vision skills are an adapter).
    `allowed_local_media_path`: the directory (resolved) whose files chat messages may
    name by file:// URL; None: no file:// URL is read (engine/media.py).
    `video_num_frames`, `video_fps` (media_io_kwargs {"video": {"num_frames", "fps"}}):
    how many frames of a decoded video file are kept (engine/video_decode.py).
    """

    limit_per_prompt: dict[str, int] = field(default_factory=dict)
    default_loras: dict[str, str] = field(default_factory=dict)
    allowed_local_media_path: str | None = None
    video_num_frames: int = VIDEO_NUM_FRAMES
    video_fps: float = -1.0
    # mm_processor_kwargs: the model's processor's options for every request (a request's
    # own go over them); the keys the processor takes are checked when it loads
    processor_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, limit: dict | str | None, default_loras: dict | str | None,
                  allowed_local_media_path: str | None = None,
                  media_io_kwargs: dict | str | None = None,
                  mm_processor_kwargs: dict | str | None = None) -> MultiModalConfig:
        if isinstance(limit, str) and not limit.lstrip().startswith("{"):
            limit = _legacy_limits(limit)  # vLLM's older "image=2,video=1"
        limits = {}
        for modality, value in _json_dict("limit_mm_per_prompt", limit).items():
            count = value.get("count") if isinstance(value, dict) else value  # vLLM's
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"limit_mm_per_prompt: {modality}={value!r}: give a count "
                                 ">= 0 (or {\"count\": n})")
            limits[modality] = count
        loras = _json_dict("default_mm_loras", default_loras)
        for modality, path in loras.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"default_mm_loras: {modality}={path!r}: give the "
                                 "adapter's path or hub id")
        num_frames, fps = _video_io(json_object("media_io_kwargs", media_io_kwargs,
                                                " of modalities"))
        return cls(limits, dict(loras), _media_dir(allowed_local_media_path), num_frames, fps,
                   dict(json_object("mm_processor_kwargs", mm_processor_kwargs)))

    def takes(self, modality: str) -> bool:
        return self.limit_per_prompt.get(modality) != 0

    def check_count(self, modality: str, count: int) -> None:
        limit = self.limit_per_prompt.get(modality)
        if limit is not None and count > limit:
            raise ValueError(f"At most {limit} {modality}(s) may be provided in one prompt, "
                             f"got {count} (limit_mm_per_prompt / --limit-mm-per-prompt)")


def _media_dir(path: str | None) -> str | None:
    """--allowed-local-media-path checked as vLLM checks it (an existing directory), then
    resolved, so a file's resolved path is compared with the directory's real one."""
    if not path:
        return None
    where = Path(path)
    if not where.exists():
        raise ValueError(f"Invalid `--allowed-local-media-path`: The path {where} does not "
                         "exist.")
    if not where.is_dir():
        raise ValueError(f"Invalid `--allowed-local-media-path`: The path {where} must be a "
                         "directory.")
    return str(where.resolve())


def _video_io(kwargs: dict) -> tuple[int, float]:
    """media_io_kwargs' video options (vLLM's VideoMediaIO / OpenCV loader): num_frames
    (-1: every frame) and fps (> 0: at most duration x fps frames; -1: no such cap)."""
    unknown = sorted(set(kwargs) - {"video"})
    if unknown:
        raise ValueError(f"media_io_kwargs: {unknown[0]!r} takes no options here; only "
                         "\"video\" is read ({\"num_frames\": n, \"fps\": f})")
    video = json_object("media_io_kwargs['video']", kwargs.get("video"))
    unknown = sorted(set(video) - {"num_frames", "fps"})
    if unknown:
        raise ValueError(f"media_io_kwargs['video']: unknown option {unknown[0]!r}; use "
                         "num_frames, fps")
    num_frames, fps = video.get("num_frames", VIDEO_NUM_FRAMES), video.get("fps", -1)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not (
            num_frames == -1 or num_frames > 0):
        raise ValueError(f"media_io_kwargs['video']: num_frames must be a positive int or -1 "
                         f"(every frame), got {num_frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not (fps == -1 or fps > 0):
        raise ValueError(f"media_io_kwargs['video']: fps must be positive or -1 (no cap), "
                         f"got {fps!r}")
    return num_frames, float(fps)


def _legacy_limits(text: str) -> dict[str, int]:
    limits = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        modality, eq, count = item.partition("=")
        if not eq or not count.strip().isdigit():
            raise ValueError(f"limit_mm_per_prompt={text!r}: give JSON like "
                             "'{\"image\": 2}' (or image=2,video=1)")
        limits[modality.strip()] = int(count)
    return limits


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    lora_config: LoRAConfig | None
    speculative_config: SpeculativeConfig | None = None
    multimodal_config: MultiModalConfig = field(default_factory=MultiModalConfig)


# vLLM's name for the whole engine config (what a custom logits processor's __init__ gets,
# `from vllm.config import VllmConfig`): its model_config, cache_config, scheduler_config,
# lora_config, speculative_config and multimodal_config are loraplex's own
VllmConfig = EngineConfig

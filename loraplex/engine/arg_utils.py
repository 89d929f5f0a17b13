"""EngineArgs: the flat, vLLM-named options a user passes; turned into validated configs."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from loraplex.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    MultiModalConfig,
    PoolerConfig,
    SchedulerConfig,
    SpeculativeConfig,
    resolve_dtype,
)
from loraplex.models.config_flags import long_lora_max_position, max_positions
from loraplex.models.gguf_loader import is_gguf_model
from loraplex.models.registry import architecture, is_classifier, is_headless
from loraplex.reasoning import REASONING_PARSERS

logger = logging.getLogger(__name__)

# vLLM options that are accepted for compatibility but change nothing here.
_IGNORED_WHEN_SET = {
    "trust_remote_code": False,
    "swap_space": None,
    "disable_log_stats": False,
    "max_seq_len_to_capture": None,
    "fully_sharded_loras": False,
    "disable_custom_all_reduce": False,
    "cpu_offload_gb": 0,
}
_warned: set[str] = set()


@dataclass
class EngineArgs:
    model: str
    tokenizer: str | None = None
    revision: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool | None = None  # None: on, as in vLLM v1
    enable_prefix_caching: bool | None = None  # None: on, as in vLLM v1
    # a hybrid's recurrent-state snapshots for prefix caching (config.py's CacheConfig)
    mamba_state_snapshots: int | None = None
    # vLLM's: "fcfs" | "priority" (requests' priority, lower first; engine/scheduler.py)
    scheduling_policy: str = "fcfs"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    cpu_kv_cache_gib: float = 2.0
    # vLLM's: "auto" (the model's dtype), "fp8" / "fp8_e4m3", "fp8_e5m2" (config.py)
    kv_cache_dtype: str = "auto"
    device: str = "auto"
    # "auto", "gguf", "dummy", "mistral" (Mistral's consolidated*.safetensors; auto when
    # the model has them, as in vLLM), ... (models/mistral_format.py)
    load_format: str = "auto"
    # vLLM's: "auto", "hf" (config.json) or "mistral" (params.json; auto beside
    # consolidated*.safetensors)
    config_format: str = "auto"
    # vLLM's: "auto", "hf" ("slow": the same here) or "mistral" (mistral_common's tokenizer,
    # engine/mistral_tokenizer.py; auto for a Mistral-format checkpoint that ships one)
    tokenizer_mode: str = "auto"
    served_model_name: str | list[str] | None = None
    quantization: str | None = None
    tensor_parallel_size: int = 1
    max_logprobs: int = 20  # vLLM's: the most logprobs a request may ask for; -1: no limit
    # vLLM's: prompts may be given as embeddings (engine/prompt_embeds.py)
    enable_prompt_embeds: bool = False
    # vLLM's: the most items of each modality one prompt may carry, e.g. {"image": 2};
    # {"image": 0} serves a multimodal checkpoint on text, without its vision tower
    limit_mm_per_prompt: dict | str | None = None
    # vLLM's: chat messages may name files under this directory by file:// URL
    allowed_local_media_path: str | None = None
    # vLLM's: per modality, how media is read; here {"video": {"num_frames": 32, "fps": -1}}
    media_io_kwargs: dict | str | None = None
    # vLLM's: the model's processor's options, e.g. Gemma 3's {"do_pan_and_scan": True}
    mm_processor_kwargs: dict | str | None = None
    reasoning_parser: str | None = None  # vLLM's names (loraplex/reasoning.py)
    generation_config: str = "auto"  # vLLM's: "auto" | "vllm" | a folder (generation_config.py)
    # vLLM's runner: "auto" (generate, or pooling for a headless `*Model` checkpoint),
    # "generate" or "pooling" (embeddings: LLM.embed, /v1/embeddings); vLLM's older
    # task="embed" and convert="embed" mean pooling too
    runner: str = "auto"
    task: str = "auto"
    convert: str = "auto"
    # vLLM's PoolerConfig as a dict or JSON: pooling_type (LAST / MEAN / CLS), normalize,
    # dimensions; unset fields come from the checkpoint's sentence-transformers files,
    # else LAST + normalize. pooler_config is vLLM's newer name
    override_pooler_config: dict | str | None = None
    pooler_config: dict | str | None = None
    # LoRA
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    lora_extra_vocab_size: int = 256
    long_lora_scaling_factors: tuple[float, ...] | None = None
    # vLLM's: {modality: adapter path or hub id}, the adapter a prompt with that
    # modality's data runs under when its request names none (config.py: MultiModalConfig)
    default_mm_loras: dict | str | None = None
    # which modules get adapter slots (SGLang's flag; a list, or "q_proj,v_proj"; None or
    # "all": every module the model supports)
    lora_target_modules: list[str] | str | None = None
    # adapters with fully trained embed_tokens / lm_head (PEFT's modules_to_save; the name
    # of Aphrodite's flag): each slot holds two vocabulary tables
    enable_lora_modules_to_save: bool = False
    # vLLM's: LoRA on a multimodal model's vision / audio tower and projector too
    enable_tower_connector_lora: bool = False
    # loraplex's own: how adapters share the slots when more are wanted than max_loras
    lora_scheduling_policy: str = "fair"  # "fair" | "fcfs" (see engine/scheduler.py)
    lora_min_slice_steps: int = 16
    max_lora_load_workers: int = 2
    # CUDA graphs for decode (CUDA only): enforce_eager=True turns them off;
    # cuda_graph_sizes: batch sizes to capture (a list, or "1,2,4"; one value = up to it)
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | str | int | None = None
    # vLLM's speculative_config: a dict or its JSON text, ngram (prompt lookup) or a draft
    # model
    # (config.py: SpeculativeConfig)
    speculative_config: dict | str | None = None
    # vLLM's hf_overrides: a dict (or its JSON text) merged into the checkpoint's HF config
    # before the model is built (models/hf_overrides.py), e.g. a causal LM served as a
    # reranker (models/lm_head_classifier.py)
    hf_overrides: dict | str | None = None
    # vLLM's custom logits processors (engine/logits_processors.py): LogitsProcessor
    # subclasses, or their names as "pkg.module:Class"
    logits_processors: list[type | str] | None = None
    # accepted for vLLM compatibility; see _IGNORED_WHEN_SET
    trust_remote_code: bool = False
    swap_space: float | None = None
    disable_log_stats: bool = False
    max_seq_len_to_capture: int | None = None
    fully_sharded_loras: bool = False
    disable_custom_all_reduce: bool = False
    cpu_offload_gb: float = 0

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def _warn_ignored(self, device: torch.device) -> None:
        ignored = dict(_IGNORED_WHEN_SET)
        if device.type == "cpu":
            ignored["gpu_memory_utilization"] = 0.9
        for name, default in ignored.items():
            if getattr(self, name) != default and name not in _warned:
                _warned.add(name)
                logger.warning("%s=%r has no effect in loraplex (accepted for vLLM "
                               "compatibility)", name, getattr(self, name))

    def _refuse_unsupported(self, hf_config: Any) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet")
        if self.load_format not in ("auto", "dummy", "safetensors", "pt", "bitsandbytes",
                                    "gguf", "mistral"):
            raise ValueError(f"load_format={self.load_format!r}: use 'auto', 'gguf', "
                             "'mistral' or 'dummy'")
        if self.quantization == "gguf" and not is_gguf_model(self.model, self.load_format):
            raise ValueError(f"quantization='gguf' needs a GGUF file as the model, not "
                             f"{self.model!r}")
        if self.load_format == "bitsandbytes" and self.quantization not in (None,
                                                                            "bitsandbytes"):
            raise ValueError(f"load_format='bitsandbytes' goes with quantization='bitsandbytes',"
                             f" not {self.quantization!r}")
        if self.default_mm_loras and not self.enable_lora:
            raise ValueError("default_mm_loras needs enable_lora")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser={self.reasoning_parser!r}: use one of "
                             + ", ".join(REASONING_PARSERS))
        if self.long_lora_scaling_factors and not self.enable_lora:
            raise ValueError("long_lora_scaling_factors needs enable_lora")
        if any(not f >= 1.0 for f in self.long_lora_scaling_factors or ()):
            raise ValueError(f"long_lora_scaling_factors={self.long_lora_scaling_factors}: "
                             "each factor is how many times longer than the base's context "
                             "an adapter was trained, >= 1")

    def resolve_runner(self, hf_config: Any) -> str:
        """"generate" or "pooling", from runner / task / convert and the checkpoint."""
        choices = {"runner": ("auto", "generate", "pooling"),
                   "task": ("auto", "generate", "embed", "classify"),
                   "convert": ("auto", "none", "embed", "classify")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; use one "
                                 "of: " + ", ".join(allowed))
        wants = {"pooling" if self.runner == "pooling" or self.task in ("embed", "classify")
                 or self.convert in ("embed", "classify") else None,
                 "generate" if self.runner == "generate" or self.task == "generate" else None}
        wants.discard(None)
        if len(wants) > 1:
            raise ValueError(f"runner={self.runner!r}, task={self.task!r} and "
                             f"convert={self.convert!r} disagree")
        headless = is_headless(hf_config)
        runner = wants.pop() if wants else ("pooling" if headless else "generate")
        if runner == "generate" and headless:
            raise ValueError(f"{hf_config.architectures[0]} has no lm_head (an embedding "
                             "model's checkpoint): it can only run as runner='pooling'")
        return runner

    def resolve_pooling_task(self, hf_config: Any) -> str:
        """A pooling runner's "embed" or "classify": classify for a
        `*ForSequenceClassification` checkpoint unless task / convert say embed (its
        pooled hidden state); classify asked of any other checkpoint is refused (it has
        no trained head to apply)."""
        asked = {v for v in (self.task, self.convert) if v in ("embed", "classify")}
        if len(asked) > 1:
            raise ValueError(f"task={self.task!r} and convert={self.convert!r} disagree")
        classifier = is_classifier(hf_config)
        task = asked.pop() if asked else ("classify" if classifier else "embed")
        if task == "classify" and not classifier:
            raise ValueError("classify needs a *ForSequenceClassification checkpoint (its "
                             f"trained score head); {hf_config.architectures} has none")
        return task

    def create_engine_config(self, hf_config: Any) -> EngineConfig:
        from loraplex.layers.quantization import quant_config_from_hf

        self._refuse_unsupported(hf_config)
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if self.device == "auto" else self.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}, but this torch ({torch.__version__}) "
                             "sees no CUDA GPU")
        if device.type == "cuda" and device.index is None:  # "the current GPU" is per thread:
            device = torch.device("cuda", torch.cuda.current_device())  # fix it now
        self._warn_ignored(device)
        dtype = resolve_dtype(self.dtype, getattr(hf_config, "dtype", None)
                              or getattr(hf_config, "torch_dtype", None), device)
        limit = long_lora_max_position(hf_config, self.long_lora_scaling_factors)
        max_model_len = self.max_model_len or max_positions(hf_config)
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's limit of "
                             f"{limit} positions" + (
                                 "" if self.long_lora_scaling_factors else
                                 " (long-context LoRA adapters: --long-lora-scaling-factors "
                                 "raises it)"))
        runner = self.resolve_runner(hf_config)
        if self.override_pooler_config is not None and self.pooler_config is not None:
            raise ValueError("give pooler_config or override_pooler_config, not both")
        pooler = PoolerConfig.from_json(self.pooler_config or self.override_pooler_config)
        if pooler is not None and runner != "pooling":
            raise ValueError("pooler_config applies to runner='pooling' only")
        served = self.served_model_name
        if isinstance(served, list):
            served = served[0] if served else None
        model_config = ModelConfig(
            model=self.model, tokenizer=self.tokenizer or self.model, dtype=dtype,
            device=device, max_model_len=max_model_len, seed=self.seed,
            load_format=self.load_format, revision=self.revision, served_model_name=served,
            enforce_eager=self.enforce_eager, max_logprobs=self.max_logprobs,
            enable_prompt_embeds=self.enable_prompt_embeds,
            reasoning_parser=self.reasoning_parser or (  # vLLM reads gpt-oss's as harmony
                "openai_gptoss" if architecture(hf_config) == "GptOssForCausalLM" else None),
            generation_config=self.generation_config, runner=runner,
            pooling_task=self.resolve_pooling_task(hf_config) if runner == "pooling"
            else None,
            pooler_config=pooler if runner == "pooling" else None,
            is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False)
                               or getattr(hf_config, "matryoshka_dimensions", None)),
            matryoshka_dimensions=tuple(getattr(hf_config, "matryoshka_dimensions", None)
                                        or ()) or None,
            cuda_graph_sizes=_parse_sizes(self.cuda_graph_sizes),
            quantization=quant_config_from_hf(hf_config, None if self.quantization == "gguf"
                                              else self.quantization or (
                "bitsandbytes" if self.load_format == "bitsandbytes" else None)))
        cache_config = CacheConfig(
            block_size=self.block_size, kv_cache_bytes=self.kv_cache_memory_bytes,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib, cache_dtype=self.kv_cache_dtype,
            num_blocks_override=self.num_gpu_blocks_override,
            mamba_state_snapshots=self.mamba_state_snapshots,
            # pooling takes nothing from the prefix cache: off unless asked for
            enable_prefix_caching=self.enable_prefix_caching is True or (
                self.enable_prefix_caching is None and runner == "generate"))
        chunked = self.enable_chunked_prefill is not False
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or (
                8192 if chunked else max(8192, max_model_len)),
            max_model_len=max_model_len, enable_chunked_prefill=chunked,
            lora_policy=self.lora_scheduling_policy,
            lora_min_slice_steps=self.lora_min_slice_steps, policy=self.scheduling_policy)
        lora_config = None
        if self.enable_lora:
            lora_dtype = None if self.lora_dtype in ("auto", None) else resolve_dtype(
                self.lora_dtype, None, device)
            lora_config = LoRAConfig(
                max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                max_cpu_loras=self.max_cpu_loras, lora_dtype=lora_dtype,
                lora_extra_vocab_size=self.lora_extra_vocab_size,
                long_lora_scaling_factors=tuple(self.long_lora_scaling_factors or ()),
                num_load_workers=self.max_lora_load_workers,
                target_modules=_parse_names(self.lora_target_modules),
                modules_to_save=self.enable_lora_modules_to_save,
                tower_connector_lora=self.enable_tower_connector_lora)
        elif self.enable_tower_connector_lora:
            raise ValueError("enable_tower_connector_lora needs enable_lora")
        return EngineConfig(model_config, cache_config, scheduler_config, lora_config,
                            parse_speculative_config(self.speculative_config),
                            MultiModalConfig.from_args(
                                self.limit_mm_per_prompt, self.default_mm_loras,
                                self.allowed_local_media_path, self.media_io_kwargs,
                                self.mm_processor_kwargs))


@dataclass
class AsyncEngineArgs(EngineArgs):
    """vLLM's arguments for AsyncLLMEngine.from_engine_args: the same fields as
    EngineArgs (the async engine steps the same LLMEngine on a thread of its own)."""


def parse_speculative_config(spec: dict | str | None) -> SpeculativeConfig | None:
    """speculative_config as given in Python (a dict) or on the command line (JSON)."""
    if spec is None or isinstance(spec, SpeculativeConfig):
        return spec
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    return SpeculativeConfig.from_dict(spec)


def _parse_names(names: list[str] | str | None) -> tuple[str, ...] | None:
    """lora_target_modules as given in Python or on the command line ("q_proj,v_proj" or
    "q_proj v_proj"); None for every module ("all")."""
    if names is None:
        return None
    items = [names] if isinstance(names, str) else list(names)
    parsed = tuple(n for item in items for n in re.split(r"[,\s]+", item.strip()) if n)
    return None if not parsed or "all" in parsed else parsed


def _parse_sizes(sizes: list[int] | str | int | None) -> tuple[int, ...] | None:
    """cuda_graph_sizes as given in Python (a list or an int) or on the command line
    ("8", "1,2,4" or "1 2 4")."""
    if sizes is None or isinstance(sizes, int) and not isinstance(sizes, bool):
        return None if sizes is None else (sizes,)
    if isinstance(sizes, str):
        try:
            return tuple(int(v) for v in sizes.replace(",", " ").split())
        except ValueError:
            raise ValueError(f"cuda_graph_sizes={sizes!r}: expected batch sizes like "
                             "'1,2,4,8'") from None
    return tuple(sizes)

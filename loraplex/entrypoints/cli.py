"""The ``loraplex`` command: ``serve`` (OpenAI server), ``demo``; vLLM's flag names.

Heavy imports (torch, transformers, fastapi) happen only once a command runs, so
``--help`` and flag errors are instant. A bad flag or a bad start-up input prints one
line (``loraplex serve: error: ...``) and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_STARTUP = 1


class CLIError(Exception):
    """A user input problem: printed as one line, exit status 1."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only when it says something (not None, [] or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@dataclass
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(item: str) -> LoRAModulePath:
    """``name=path`` or JSON ``{"name": ..., "path": ..., "base_model_name": ...}``."""
    item = item.strip()
    if item.startswith("{"):
        try:
            obj = json.loads(item)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--lora-modules item is not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not obj.get("name") or not obj.get("path"):
            raise argparse.ArgumentTypeError(
                "a JSON --lora-modules item needs \"name\" and \"path\"")
        unknown = set(obj) - {"name", "path", "base_model_name"}
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown key(s) in --lora-modules item: {', '.join(sorted(unknown))}")
        return LoRAModulePath(str(obj["name"]), str(obj["path"]), obj.get("base_model_name"))
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--lora-modules item {item!r}: use name=path or a JSON object")
    return LoRAModulePath(name, path)


def parse_human_int(text: str) -> int:
    """``2048``, ``4k`` (4000), ``4K`` (4096), ``1m``/``1M``, as vLLM's --max-model-len."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: use e.g. 2048 or 4k")
    num, unit = float(m.group(1)), m.group(2)
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    return int(num * mult[unit])


def parse_json_list(text: str) -> list[str]:
    """A flag's JSON list of strings, as vLLM's --allowed-origins takes."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. "
                                         f"'[\"https://example.com\"]', got {text!r}")
    return value


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use 0..65535")
    return port


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace("(", "").replace(")", "").split(",")
                     if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid scaling factors {text!r}: use e.g. 4.0,8.0") from None


def parse_json_dict(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return obj


def parse_speculative_config(text: str) -> dict:
    """--speculative-config: a JSON object, checked now (config.py: SpeculativeConfig), so
    a bad one is a usage error before any model loads."""
    from loraplex.config import SpeculativeConfig  # light: dataclasses + torch

    spec = parse_json_dict(text)
    try:
        SpeculativeConfig.from_dict(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


# EngineArgs field -> help. Every field gets a flag (--field-name); types come from defaults.
ENGINE_HELP: dict[str, str] = {
    "tokenizer": "Tokenizer name or path (default: the model's).",
    "revision": "Model revision (branch, tag or commit) on the Hugging Face hub.",
    "tokenizer_revision": "Tokenizer revision on the Hugging Face hub.",
    "dtype": "Weights and activations dtype: auto (fp32 on CPU, the checkpoint's half type "
             "on GPU), float32, float16, bfloat16.",
    "seed": "Random seed of the engine.",
    "max_model_len": "Context length (prompt + output) in tokens; accepts 4k/4K. Default: the "
                     "model's max_position_embeddings.",
    "max_num_seqs": "Most sequences in one batch.",
    "max_num_batched_tokens": ("Most prompt tokens prefilled in one step; the decoding sequences' "
                               "one token each comes on top (default: 2048 for the server "
                               "and 8192 for the LLM class, as in vLLM; with "
                               "--no-enable-chunked-prefill, max(8192, max_model_len))."),
    "block_size": "Tokens per KV cache block.",
    "kv_cache_dtype": "KV cache storage: auto (the model's dtype), fp8 / fp8_e4m3 or "
                      "fp8_e5m2 (twice the tokens of bf16 in the same memory; values / the "
                      "checkpoint's k_scale, v_scale, else 1.0).",
    "enable_prefix_caching": "Share the KV cache of identical prompt prefixes (whole blocks, "
                             "under the same adapter) between requests (on by default, as "
                             "in vLLM v1); --no-enable-prefix-caching computes every prompt.",
    "mamba_state_snapshots": "A hybrid model (Mamba2, Mamba-1, LFM2, gated DeltaNet) under "
                             "prefix caching: how many snapshots of one sequence's recurrent "
                             "state to keep (taken at block boundaries of prompts, least "
                             "recently used overwritten), out of the KV cache's memory; "
                             "default: max_num_seqs, or as many as fit in a quarter of it.",
    "enable_chunked_prefill": "Split a prompt over steps when it does not fit what is left "
                              "of max_num_batched_tokens (on by default, as in vLLM v1); "
                              "--no-enable-chunked-prefill prefills every prompt whole.",
    "gpu_memory_utilization": "Fraction of GPU memory for weights, adapter slots, "
                              "activations and the KV cache (CUDA only).",
    "enforce_eager": "No CUDA graphs: every decode step launches its kernels one by one "
                     "(CUDA only; slower, for debugging).",
    "cuda_graph_sizes": "Decode batch sizes to capture as CUDA graphs, e.g. 1,2,4,8; one "
                        "value: the default sizes up to it. Default: 1, 2, 4, 8..64 by 8, "
                        "then coarser, up to --max-num-seqs.",
    "num_gpu_blocks_override": "Use exactly this many KV cache blocks.",
    "kv_cache_memory_bytes": "KV cache size in bytes (overrides the other sizing options).",
    "cpu_kv_cache_gib": "KV cache size in GiB on CPU (or env LORAPLEX_CPU_KVCACHE_SPACE).",
    "device": "auto, cpu or cuda[:N].",
    "load_format": "auto (safetensors or .bin; a .gguf file or one with GGUF's magic as "
                   "gguf; Mistral's consolidated*.safetensors as mistral, as vLLM does), "
                   "gguf, mistral (Mistral's consolidated*.safetensors), dummy (random "
                   "weights, for benchmarks) or bitsandbytes "
                   "(vLLM's older name: auto, with --quantization bitsandbytes).",
    "config_format": "Where the model's config comes from: auto (params.json beside "
                     "consolidated*.safetensors: mistral; else hf), hf (config.json) or "
                     "mistral (Mistral's params.json; text models only).",
    "tokenizer_mode": "auto (Mistral's tokenizer for a checkpoint in Mistral's format "
                      "that ships tekken.json or tokenizer.model.v*, as vLLM does; else "
                      "HF's), hf / slow (HF's) or mistral (mistral_common's tekken.json or "
                      "tokenizer.model.v*: chat encoded by mistral_common, no Jinja "
                      "template; needs loraplex[mistral]).",
    "served_model_name": "Name(s) the base model answers to in the API; the first is used "
                         "in responses. Default: the model argument.",
    "quantization": "The checkpoint's quantization method (gptq, awq, bitsandbytes, fp8 or "
                    "compressed-tensors; "
                    "vLLM's *_marlin names too). Unset = read from its config.json. "
                    "bitsandbytes / fp8 on a plain checkpoint quantize it as it loads (to "
                    "4-bit NF4; to FP8 with a scale per row).",
    "tensor_parallel_size": "Accepted for vLLM compatibility; only 1 is supported.",
    "enable_prompt_embeds": "Accept prompts given as embeddings [length, hidden] (vLLM's): "
                            "offline {'prompt_embeds': tensor}, in /v1/completions "
                            "`prompt_embeds` (base64 of torch.save bytes).",
    "max_logprobs": "The most logprobs / prompt_logprobs (and top_logprobs) a request may "
                    "ask for; -1: no limit.",
    "runner": "generate (next tokens: completions, chat) or pooling (embeddings: "
              "/v1/embeddings, LLM.embed; each request under its own adapter); auto: "
              "pooling for a checkpoint without lm_head (a *Model architecture; a "
              "*ForSequenceClassification one classifies: /classify), else generate.",
    "task": "vLLM's older name: embed = --runner pooling, generate = --runner generate; "
            "classify: a *ForSequenceClassification checkpoint's classes (/classify).",
    "convert": "vLLM's: embed turns a causal LM into an embedding model (= --runner "
               "pooling; its lm_head is not used); classify: a *ForSequenceClassification "
               "checkpoint's classes (its default).",
    "override_pooler_config": "Pooling runner: JSON {\"pooling_type\": \"LAST\" | "
                              "\"MEAN\" | \"CLS\", \"normalize\": bool, \"dimensions\": "
                              "int}; unset fields come from the checkpoint's "
                              "sentence-transformers files (modules.json, "
                              "1_Pooling/config.json), else LAST + normalize.",
    "pooler_config": "vLLM's newer name of --override-pooler-config.",
    "enable_lora": "Enable LoRA adapters (required for --lora-modules and runtime loading).",
    "max_loras": "Most distinct adapters in one batch (device slots).",
    "max_lora_rank": "Largest adapter rank that can be loaded; a higher-rank adapter is "
                     "refused with a clear error.",
    "max_cpu_loras": "Adapters kept in host memory (LRU); default: --max-loras.",
    "lora_dtype": "Dtype of adapter weights: auto (the model's), float16, bfloat16, float32.",
    "lora_extra_vocab_size": "Most tokens one adapter may add to the vocabulary (trained "
                             "after tokenizer.add_tokens; served with the adapter's own "
                             "tokenizer). Each slot reserves rows for this many.",
    "long_lora_scaling_factors": "RoPE scaling factors for long-context LoRA (LongLoRA), e.g. "
                                 "4.0,8.0: an adapter whose context_length is f x the base's "
                                 "max_position_embeddings is served with rope scaled "
                                 "linearly by f; max_model_len may go up to the base's "
                                 "length x the largest factor.",
    "default_mm_loras": "JSON {modality: adapter path or hub id}, e.g. '{\"image\": "
                        "\"/adapters/vision\"}': a prompt with images whose request names "
                        "no adapter runs under this one (also served by the modality's "
                        "name).",
    "limit_mm_per_prompt": "JSON {modality: most items in one prompt}, e.g. '{\"image\": "
                           "2}' (or image=2); a prompt with more is refused. "
                           "'{\"image\": 0}' serves an image model on text, without "
                           "building its vision tower.",
    "allowed_local_media_path": "A directory whose files chat messages may name by file:// "
                                "URL (image_url, video_url); the file's resolved path "
                                "must lie under it. Unset: file:// URLs are refused.",
    "media_io_kwargs": "JSON {modality: options} for reading media; vLLM's video options: "
                       "'{\"video\": {\"num_frames\": 32, \"fps\": -1}}' (frames kept of a "
                       "decoded video, sampled uniformly; -1: all; fps > 0 caps them at "
                       "duration x fps).",
    "mm_processor_kwargs": "JSON options of the model's multimodal processor for every "
                           "request (a chat request's own mm_processor_kwargs go over "
                           "them); Gemma 3's pan-and-scan: '{\"do_pan_and_scan\": true}' "
                           "(and pan_and_scan_min_crop_size, pan_and_scan_max_num_crops, "
                           "pan_and_scan_min_ratio_to_activate). A key the model's "
                           "processor does not take is refused at start-up.",
    "lora_scheduling_policy": "When more adapters are wanted than --max-loras: fair (requests "
                              "for running adapters go ahead of ones waiting for a slot; "
                              "slots are time-sliced so the longest-waiting adapter gets the "
                              "next one) or fcfs (strict arrival order).",
    "scheduling_policy": "Order of the waiting requests: fcfs (arrival) or priority (a "
                         "request's priority, lower first, then arrival; a request's "
                         "nonzero priority is refused under fcfs).",
    "lora_min_slice_steps": "fair policy: steps an adapter keeps its slot before it must "
                            "drain for a waiting adapter.",
    "max_lora_load_workers": "Threads reading adapters from disk/hub off the step loop.",
    "enable_lora_modules_to_save": "Serve adapters whose embed_tokens / lm_head were fully "
                                   "trained (PEFT's modules_to_save): each slot holds its own "
                                   "copy of both vocabulary tables (2 x vocab x hidden per "
                                   "slot, from the KV cache's budget). Off: such adapters are "
                                   "refused.",
    "enable_tower_connector_lora": "LoRA on a multimodal model's vision / audio tower and "
                                   "projector too (their linear layers get the adapter "
                                   "slots; the tower runs once per adapter of a step's new "
                                   "images). Off: an adapter's LoRA there is left out with a "
                                   "warning (the language model only).",
    "reasoning_parser": "The model thinks before it answers: "
                        "chat replies carry the thinking in `reasoning` (and "
                        "`reasoning_content`) apart from `content`, tool calls are read "
                        "from the content, and structured outputs constrain only the "
                        "answer. deepseek_r1: everything before </think> (R1, QwQ, Qwen3 "
                        "thinking-only models); qwen3 (and glm45, GLM-4.5's): when the reply opens "
                        "with <think>; "
                        "openai_gptoss: gpt-oss's harmony analysis channel (the default "
                        "for gpt-oss); mistral: Magistral's [THINK] ... [/THINK]; granite: "
                        "Granite 3.2+'s 'Here is my thought process:' ... 'Here is my "
                        "response:' (phrases, not tokens: structured outputs constrain "
                        "the whole reply); seed_oss: Seed-OSS's <seed:think> as "
                        "deepseek_r1; minimax_m2: MiniMax-M2's, as deepseek_r1; "
                        "minimax_m2_append_think: all content, '<think>' put back before "
                        "it; deepseek_v3: DeepSeek-V3.1's, deepseek_r1's rule when the "
                        "request's chat_template_kwargs say thinking, else all content.",
    "generation_config": "Where generation_config.json comes from: auto (the model's), vllm "
                         "(none), or a folder. Its eos_token_id ends replies; its "
                         "temperature, top_p, top_k, min_p, repetition_penalty and "
                         "max_new_tokens are the defaults of requests that leave them unset.",
    "hf_overrides": "JSON object merged into the model's HF config before it is built "
                    "(vLLM's), e.g. a causal LM served as a reranker: '{\"architectures\": "
                    "[\"Qwen3ForSequenceClassification\"], \"classifier_from_token\": "
                    "[\"no\", \"yes\"], \"is_original_qwen3_reranker\": true}'.",
    "speculative_config": "Speculative decoding, as JSON (vLLM's): ngram (prompt lookup), "
                          "e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                          "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}', or a "
                          "small draft model of the same vocabulary, e.g. '{\"model\": "
                          "\"path-or-hub-id\", \"num_speculative_tokens\": 3}' (it runs "
                          "without adapters). Greedy outputs are unchanged; "
                          "sampled ones keep their distribution. Requests with "
                          "structured outputs decode one token per step.",
    "logits_processors": "Custom logits processors (vLLM's V1 interface, loraplex.v1.sample."
                         "logits_processor.LogitsProcessor subclasses), as pkg.module:Class "
                         "(or pkg.module.Class); a request passes them arguments in "
                         "vllm_xargs. Not with --speculative-config or --runner pooling.",
    "lora_target_modules": "The modules that get adapter slots, e.g. q_proj v_proj o_proj "
                           "(or comma-separated; q/k/v share one slot layer, as do gate/up); "
                           "an adapter on any other is refused. Fewer modules, less slot "
                           "memory (a mixture of experts' `experts` take the most). Default: "
                           "all the model supports.",
}
_SPECIAL_TYPES = {"max_model_len": parse_human_int, "long_lora_scaling_factors": parse_floats,
                  "default_mm_loras": parse_json_dict, "override_pooler_config": parse_json_dict,
                  "pooler_config": parse_json_dict, "speculative_config": parse_speculative_config,
                  "hf_overrides": parse_json_dict}
_CHOICES = {"dtype": ["auto", "float32", "float", "float16", "half", "bfloat16"],
            "lora_scheduling_policy": ["fair", "fcfs"],
            "runner": ["auto", "generate", "pooling"],
            "task": ["auto", "generate", "embed", "classify"],
            "convert": ["auto", "none", "embed", "classify"],
            "scheduling_policy": ["fcfs", "priority"],
            "lora_dtype": ["auto", "float32", "float16", "bfloat16"],
            "kv_cache_dtype": ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],  # config.py's
            "config_format": ["auto", "hf", "mistral"],
            "tokenizer_mode": ["auto", "hf", "slow", "mistral"],
            "reasoning_parser": ["deepseek_r1", "qwen3", "glm45", "openai_gptoss", "mistral",
                                 "granite", "seed_oss", "minimax_m2",
                                 "minimax_m2_append_think", "deepseek_v3"]}  # reasoning.py's


# entrypoints/tool_parsers/'s PARSERS (named here: the parser is built before heavy imports)
TOOL_CALL_PARSERS = ["hermes", "llama3_json", "mistral", "pythonic", "llama4_pythonic",
                     "qwen3_coder", "openai", "granite", "phi4_mini_json", "glm45",
                     "deepseek_v3", "deepseek_v31", "kimi_k2", "minimax_m2", "seed_oss"]
_SHORT_FLAGS = {"quantization": ("-q",), "tensor_parallel_size": ("-tp",),  # vLLM's
                # as Mistral's model cards spell them (vLLM takes any flag with "_")
                "tokenizer_mode": ("--tokenizer_mode",), "config_format": ("--config_format",),
                "load_format": ("--load_format",)}


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    from_engine = parser.add_argument_group("engine (vLLM's EngineArgs)")
    for f in _engine_fields():
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = ENGINE_HELP.get(f.name, "Accepted for vLLM compatibility; no effect in "
                                            "loraplex.")
        help_text += f" (default: {default})" if default not in (None, "") else ""
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        ann = str(f.type)
        if f.name in ("served_model_name", "lora_target_modules", "logits_processors"):
            kw["nargs"] = "+"
        elif f.name in _SPECIAL_TYPES:
            kw["type"] = _SPECIAL_TYPES[f.name]
        elif isinstance(default, bool) or ann.startswith("bool"):
            # True or unset (None): --no-... must be there too, as in vLLM
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif isinstance(default, int) or ann.startswith("int"):
            kw["type"] = int
        elif isinstance(default, float) or ann.startswith("float"):
            kw["type"] = float
        if f.name in _CHOICES:
            kw["choices"] = _CHOICES[f.name]
        from_engine.add_argument(*_SHORT_FLAGS.get(f.name, ()), flag, **kw)


def _engine_fields():
    from loraplex.engine.arg_utils import EngineArgs  # light: dataclasses + torch config
    return fields(EngineArgs)


def _add_frontend_args(group: argparse._ArgumentGroup) -> None:
    """What the serving code reads (api_server.build_state): `serve` and `run-batch`."""
    group.add_argument("--lora-modules", nargs="+", type=parse_lora_module, default=[],
                       metavar="ITEM",
                       help="Adapters to serve from the start: name=path, or JSON "
                            "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'.")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template (a file path or the template text); "
                            "default: the tokenizer's.")
    group.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="Usage tells the prompt tokens read from the prefix cache "
                            "(prompt_tokens_details.cached_tokens), as vLLM's flag does.")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="Serve tool_choice 'auto': the model calls tools in its own "
                            "format, read by --tool-call-parser.")
    group.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                       help="How the model writes tool calls: hermes (Hermes, Qwen 2.5/3: "
                            "<tool_call> tags), llama3_json (Llama 3.1/3.2: JSON), mistral "
                            "([TOOL_CALLS]), pythonic / llama4_pythonic (Llama 3.2, "
                            "Llama 4: a Python list of calls), qwen3_coder (Qwen3-Coder: "
                            "<function=...> <parameter=...> tags), openai (gpt-oss: "
                            "harmony messages to functions.NAME), granite (Granite 3: "
                            "<|tool_call|>[...]), phi4_mini_json (Phi-4-mini: "
                            "functools[...]), glm45 (GLM-4.5/4.6/4.7: <arg_key> tags), "
                            "deepseek_v3 / deepseek_v31 (DeepSeek-V3, R1-0528 / V3.1: "
                            "<｜tool▁calls▁begin｜>), kimi_k2 (Kimi-K2: "
                            "<|tool_calls_section_begin|>), minimax_m2 (MiniMax-M2: "
                            "<minimax:tool_call> invokes) or seed_oss (Seed-OSS: "
                            "<seed:tool_call>).")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="Accepted for vLLM compatibility.")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="Accepted for vLLM compatibility (prompts are not logged).")
    group.add_argument("--response-role", default="assistant",
                       help="The role of the chat replies when add_generation_prompt is "
                            "true.")


def make_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="Start the OpenAI-compatible server (vLLM's `vllm serve`).",
        description="Serve a base model and its LoRA adapters on an OpenAI-compatible API. "
                    "Every adapter is a model name: send {\"model\": \"<adapter>\"}. "
                    "Env: LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING, LORAPLEX_PLUGINS, "
                    "LORAPLEX_LORA_RESOLVER_CACHE_DIR, LORAPLEX_LORA_RESOLVER_HF_REPO_LIST, "
                    "LORAPLEX_API_KEY, LORAPLEX_CPU_KVCACHE_SPACE, LORAPLEX_LOGGING_LEVEL "
                    "(see docs/usage.md).",
        formatter_class=_HelpFormatter)
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="Model path or Hugging Face id.")
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="Same as the positional MODEL.")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="Address to listen on.")
    server.add_argument("--port", type=parse_port, default=8000,
                        help="Port to listen on (0: any free port).")
    server.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer <key>' on /v1 routes "
                             "(or env LORAPLEX_API_KEY).")
    _add_frontend_args(server)
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="Log level of uvicorn.")
    server.add_argument("--root-path", default="",
                        help="The path prefix a proxy serves this server under (FastAPI's "
                             "root_path); routes answer with or without it.")
    server.add_argument("--allowed-origins", type=parse_json_list, default=["*"],
                        help="CORS: origins browsers may call from (a JSON list).")
    server.add_argument("--allowed-credentials", action="store_true",
                        help="CORS: allow credentials (cookies, authorization headers).")
    server.add_argument("--allowed-methods", type=parse_json_list, default=["*"],
                        help="CORS: allowed methods (a JSON list).")
    server.add_argument("--allowed-headers", type=parse_json_list, default=["*"],
                        help="CORS: allowed request headers (a JSON list).")
    server.add_argument("--enable-request-id-headers", action="store_true",
                        help="Every response carries X-Request-Id: the request's own, or a "
                             "new one.")
    server.add_argument("--disable-fastapi-docs", action="store_true",
                        help="No /docs, /redoc or /openapi.json.")
    server.add_argument("--ssl-keyfile", default=None, help="TLS: the private key file.")
    server.add_argument("--ssl-certfile", default=None,
                        help="TLS: the certificate file (serve https).")
    server.add_argument("--ssl-ca-certs", default=None,
                        help="TLS: CA certificates to check client certificates against.")
    server.add_argument("--ssl-cert-reqs", type=int, default=0,
                        help="TLS: whether clients must send a certificate (Python's "
                             "ssl.CERT_*: 0 none, 1 optional, 2 required).")
    server.add_argument("--per-adapter-latency-metrics", action="store_true",
                        help="Label /metrics' latency histograms with the adapter a request "
                             "named, not the served model name (about 60 series per adapter: "
                             "for tens of adapters, not thousands).")
    _add_engine_args(p)
    p.set_defaults(func=run_serve)
    return p


def make_run_batch_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run-batch", help="Run an OpenAI batch file (vLLM's `vllm run-batch`).",
        description="Run every request of an OpenAI batch file (JSONL: custom_id, method, "
                    "url, body; /v1/chat/completions and /v1/completions) through the "
                    "serving code, adapters by `model`, and write one result line each, in "
                    "input order.",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="Model path or Hugging Face id.")
    batch = p.add_argument_group("batch")
    batch.add_argument("-i", "--input-file", required=True,
                       help="The batch file: a local path or an http(s) URL (GET).")
    batch.add_argument("-o", "--output-file", required=True,
                       help="Where the results go: a local path or an http(s) URL (PUT).")
    batch.add_argument("--output-tmp-dir", default=None,
                       help="Where the results are kept before an upload to a URL.")
    batch.add_argument("--enable-metrics", action="store_true",
                       help="Serve Prometheus metrics at http://URL:PORT/metrics meanwhile.")
    batch.add_argument("--url", default="0.0.0.0", help="The metrics server's address.")
    batch.add_argument("--port", type=parse_port, default=8000,
                       help="The metrics server's port.")
    _add_frontend_args(batch)
    _add_engine_args(p)
    p.set_defaults(func=run_batch, per_adapter_latency_metrics=False)
    return p


def make_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="Run the built-in multi-LoRA demo.",
                       description="Run the built-in multi-LoRA demo (loraplex.entrypoints.demo).")
    try:  # the demo may define its own flags; it is optional, so import lazily and softly
        from loraplex.entrypoints import demo
        add = getattr(demo, "add_cli_args", None)
    except ImportError:
        add = None
    if add is not None:
        add(p)
    else:
        p.add_argument("demo_args", nargs=argparse.REMAINDER, help="Arguments for the demo.")
    p.set_defaults(func=run_demo)
    return p


def make_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="loraplex",
                     description="loraplex: many LoRA adapters on one base LLM, with vLLM's "
                                 "API. Run 'loraplex serve --help' for the server's flags.")
    from loraplex.version import __version__
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    make_serve_parser(sub)
    make_run_batch_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        make_demo_parser(sub)
    else:
        sub.add_parser("demo", help="Run the built-in multi-LoRA demo.", add_help=False)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    try:
        from loraplex.entrypoints.demo import main as demo_main
    except ImportError as e:
        raise CLIError(f"the demo is not available in this install: {e}") from e
    result = demo_main(args)
    return int(result or 0)


def run_batch(args: argparse.Namespace) -> int:
    from loraplex.entrypoints.run_batch import main as run_batch_main
    return run_batch_main(args)


def run_serve(args: argparse.Namespace) -> int:
    from loraplex.entrypoints.api_server import serve
    return serve(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "serve":
        if args.model_tag and args.model_flag and args.model_tag != args.model_flag:
            parser.error(f"two models given: {args.model_tag!r} and --model "
                         f"{args.model_flag!r}")
        args.model = args.model_tag or args.model_flag
        if not args.model:
            parser.error("serve needs a MODEL (path or Hugging Face id)")
    try:
        return args.func(args)
    except CLIError as e:
        print(f"loraplex {args.command}: error: {e}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the importable module's main, so CLIError raised elsewhere is this CLIError.
    from loraplex.entrypoints.cli import main as _main
    sys.exit(_main())

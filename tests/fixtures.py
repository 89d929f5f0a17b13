"""Offline test fixtures: a tiny tokenizer, tiny random models, PEFT adapters, HF references.

Everything is built on the fly (no network). The HF transformers + PEFT runners in fp32 on CPU
are the ground truth that every loraplex correctness test compares against.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "ARCHS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TOKENIZER_VOCAB_SIZE",
    "make_tokenizer",
    "load_tokenizer",
    "make_tiny_model",
    "make_peft_adapter",
    "make_added_tokens_adapter",
    "load_hf_model",
    "hf_greedy",
    "hf_logprobs",
    "assert_greedy_close",
    "SAMPLE_SENTENCES",
]

ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
# built on demand (not in the session-wide fixtures): tests/test_architectures.py
EXTRA_ARCHS: tuple[str, ...] = ("gemma", "gemma2", "phi3", "mixtral", "qwen3_moe", "granite",
                                "olmo2", "gemma3", "qwen2_moe")

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
TOKENIZER_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Small built-in English corpus; enough distinct pairs for ~250 BPE merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a little girl who lived in a village near the forest.
Whenever she went out, the little girl wore a red riding cloak, so everyone in the village called her Little Red Riding Hood.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world.
In the beginning the Universe was created. This has made a lot of people very angry and been widely regarded as a bad move.
All happy families are alike; each unhappy family is unhappy in its own way.
The sun rose slowly over the mountains, painting the sky with shades of orange, pink and gold.
Machine learning models learn patterns from data and use them to make predictions about new examples.
A language model assigns a probability to every possible next token given the tokens that came before it.
Low rank adaptation trains two small matrices whose product is added to a frozen weight matrix.
Serving many adapters on one base model lets a single server answer requests for many different tasks.
What is the capital of France? The capital of France is Paris, a city famous for its art, food and history.
Please write a short poem about the ocean, the wind, and the stars that shine above the quiet sea.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
How much wood would a woodchuck chuck if a woodchuck could chuck wood?
The weather today is cloudy with a chance of rain in the afternoon and clear skies in the evening.
He opened the door, looked around the empty room, and wondered where everyone had gone.
Numbers like 1, 2, 3, 42, 100 and 2024 appear in text; so do symbols such as #, $, %, & and @.
Good morning! How are you doing today? I am doing well, thank you for asking.
The committee will meet on Monday to discuss the budget, the schedule and the new hiring plan.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
Reading books, walking in the park and cooking dinner with friends are some of my favorite things.
The engine processes requests in batches, schedules tokens fairly and streams results back to users.
"""

SAMPLE_SENTENCES: tuple[str, ...] = (
    "Hi",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "Machine learning models learn patterns from data and use them to make good predictions.",
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer() -> Tokenizer:
    """Train the byte-level BPE once per process: training is the slow part."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Llama-style: prepend BOS to every encoded sequence; byte-level keeps text round-trippable.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a fresh copy so callers cannot mutate the cached trained object."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Save the session tokenizer (trained once) to ``out_dir`` and return it.

    BOS ``<s>`` is prepended on encode (``add_special_tokens=True``); eos ``</s>``, pad ``<pad>``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = _wrap(_trained_tokenizer())
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The session tokenizer without saving it anywhere."""
    return _wrap(_trained_tokenizer())


def _arch_config(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    tie_word_embeddings: bool,
    rope_scaling: dict[str, Any] | None,
    overrides: dict[str, Any],
) -> Any:
    """Build the transformers config; rope_scaling is handed to transformers to normalize."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        rms_norm_eps=1e-6,
        hidden_act="silu",
        head_dim=hidden_size // num_heads,
    )
    if rope_scaling is not None:
        common["rope_scaling"] = dict(rope_scaling)
    if arch == "mistral":
        common["sliding_window"] = None
    elif arch == "qwen2":
        common.update(use_sliding_window=False, sliding_window=None)
    elif arch == "qwen3":
        common.update(use_sliding_window=False, sliding_window=None, attention_bias=False)
    elif arch == "gemma":
        common.update(hidden_act="gelu_pytorch_tanh", attention_bias=False)
    elif arch == "gemma2":  # caps small enough to bite on tiny random weights
        common.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                      query_pre_attn_scalar=24, attn_logit_softcapping=8.0,
                      final_logit_softcapping=20.0, sliding_window=4096)
    elif arch == "phi3":
        common.update(sliding_window=None, original_max_position_embeddings=512)
    elif arch == "granite":  # multipliers far enough from 1 to matter
        common.update(embedding_multiplier=6.0, residual_multiplier=0.3,
                      attention_multiplier=0.2, logits_scaling=2.5, attention_bias=False)
    elif arch == "gemma3":  # a local (window 6) and a global layer, each with its rope base
        common.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                      query_pre_attn_scalar=24, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"])
    elif arch == "qwen2_moe":  # a shared expert beside the routed ones
        common.update(use_sliding_window=False, sliding_window=None, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                      shared_expert_intermediate_size=40, mlp_only_layers=[],
                      decoder_sparse_step=1)
    elif arch == "olmo2":
        common.update(attention_bias=False)
    elif arch == "mixtral":
        common.update(sliding_window=None, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen3_moe":  # layer 1 keeps a plain MLP; top-2 weights not renormalized
        common.update(sliding_window=None, attention_bias=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                      mlp_only_layers=[1], decoder_sparse_step=1)
    elif arch == "gpt_oss":  # a local (window 6) and a global layer, YaRN, sinks; a clamp
        # of 1.5 bites on these weights (transformers 5 reads it: see make_tiny_model)
        common.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.5,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0,
                                    "original_max_position_embeddings": 128})
    elif arch == "llama_bias":  # Llama's optional biases, everywhere
        common.update(attention_bias=True, mlp_bias=True)
    elif arch == "smollm3":  # layer 1 without rotary positions (NoPE)
        common.update(no_rope_layers=[1, 0], use_sliding_window=False)
    elif arch == "exaone4":  # a local (window 6, rotary) and a global layer (NoPE)
        common.update(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    elif arch == "seed_oss":
        common.update(attention_bias=True, attention_out_bias=True, mlp_bias=True)
    elif arch == "ministral":  # a local (window 6) and a global layer
        common.update(sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    elif arch == "ernie4_5":  # interleaved rotary, biases everywhere
        common.update(use_bias=True)
    elif arch in ("glm", "glm4"):  # q/k/v biases, half the head rotated (interleaved)
        common.update(attention_bias=True, partial_rotary_factor=0.5)
    elif arch == "hunyuan":  # q/k norm after the rotation, NTK-alpha rope, biases
        common.update(attention_bias=True, rope_scaling={
            "rope_type": "dynamic", "type": "dynamic", "alpha": 100.0, "factor": 1.0})
    elif arch == "arcee":  # an MLP without a gate, squared ReLU; biases
        common.update(hidden_act="relu2", attention_bias=True, mlp_bias=True)
    elif arch == "nemotron":  # no gate, squared ReLU, LayerNorm "1P", half the head rotated
        common.update(hidden_act="relu2", norm_eps=1e-5, attention_bias=True,
                      partial_rotary_factor=0.5)
    elif arch == "starcoder2":  # c_fc / c_proj without a gate, LayerNorm, biases, a window
        common.update(hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5, use_bias=True,
                      sliding_window=6)
    elif arch == "cohere":  # parallel sublayers, LayerNorm, q/k norm per head, logit scale
        common.update(layer_norm_eps=1e-5, use_qk_norm=True, logit_scale=0.5,
                      attention_bias=True)
    elif arch == "cohere2":  # ... and a local (window 6, rotary) and a global layer (NoPE)
        common.update(layer_norm_eps=1e-5, logit_scale=0.5, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"])
    elif arch == "glm4_moe":  # grouped sigmoid routing (4 groups of 2, 2 eligible), a
        # scaling, a shared expert, layer 0 dense; q/k norm, q/k/v biases, partial rotary
        common.update(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                      moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
                      routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
                      attention_bias=True, partial_rotary_factor=0.5)
    elif arch == "olmo3":  # a local (window 6) and a global layer, YaRN on the global one
        common.update(attention_bias=False, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"],
                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 128})
    elif arch == "olmoe":  # q/k norm over all heads; top-2 of 4, not renormalized
        common.update(attention_bias=False, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=False, clip_qkv=None)
    elif arch == "minimax_m2":  # sigmoid routing with a correction bias, partial rotary
        common.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48,
                      rotary_dim=8)
    elif arch == "ernie4_5_moe":  # softmax routing with a correction bias (top-2 of 8),
        # a shared expert, layer 0 dense; interleaved rotary
        common.update(moe_num_experts=8, moe_k=2, moe_intermediate_size=48,
                      moe_num_shared_experts=1, moe_layer_start_index=1)
    elif arch == "hunyuan_moe":  # Hunyuan's attention; softmax top-2 of 4 renormalized,
        # a shared MLP beside the experts in every layer
        common.update(attention_bias=True, num_experts=4, moe_topk=2, intermediate_size=48,
                      rope_scaling={"rope_type": "dynamic", "type": "dynamic",
                                    "alpha": 100.0, "factor": 1.0})
    elif arch == "dots1":  # Qwen3's attention, a local layer (window 6); grouped sigmoid
        # routing (4 groups of 2, 2 eligible), a scaling, a shared expert, layer 0 dense
        common.update(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                      moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
                      routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
                      sliding_window=6, layer_types=["full_attention", "sliding_attention"])
    elif arch == "apertus":  # xIELU MLP, q/k norm, Llama 3 rope scaling, biases
        common.update(hidden_act="xielu", attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_theta": 10000.0})
    elif arch == "phi":  # parallel sublayers on one LayerNorm, fc1/fc2 GELU, partial rotary,
        # q/k LayerNorm, lm_head with a bias
        common.update(hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.5,
                      qk_layernorm=True)
    elif arch == "phi2":  # Phi-2's: no q/k norm, tied nothing
        common.update(hidden_act="gelu_new", layer_norm_eps=1e-5, partial_rotary_factor=0.4)
    elif arch == "stablelm":  # LayerNorm, partial rotary, q/k/v biases
        common.update(layer_norm_eps=1e-5, partial_rotary_factor=0.25, use_qkv_bias=True)
    elif arch == "stablelm_parallel":  # ... its sublayers side by side on one norm
        common.update(layer_norm_eps=1e-5, partial_rotary_factor=0.5, use_qkv_bias=False,
                      use_parallel_residual=True)
    elif arch == "stablelm_qk":  # ... and a LayerNorm per head on q and k (StableLM 2 12B's)
        common.update(layer_norm_eps=1e-5, partial_rotary_factor=0.25, use_qkv_bias=False,
                      use_parallel_residual=True, qk_layernorm=True)
    elif arch == "olmo":  # LayerNorm without parameters, q/k/v clamped, biases
        common.update(clip_qkv=0.6, attention_bias=True)
    elif arch == "helium":  # interleaved rotary, q/k/v and MLP biases
        common.update(attention_bias=True, mlp_bias=True)
    elif arch == "gpt_neox":  # q/k/v fused per head, parallel sublayers (two norms)
        common.update(hidden_act="gelu", layer_norm_eps=1e-5, partial_rotary_factor=0.25,
                      rotary_pct=0.25, use_parallel_residual=True)
    elif arch == "gpt_neox_sequential":  # ... or one after the other
        common.update(hidden_act="gelu", layer_norm_eps=1e-5, partial_rotary_factor=0.5,
                      rotary_pct=0.5, use_parallel_residual=False)
    elif arch == "phimoe":  # sparsemixer routing (a jitter eps that masks some experts),
        # LayerNorm, biases on q/k/v/o and lm_head, LongRoPE with its own mscale
        common.update(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.1,
                      input_jitter_noise=0.0, attention_bias=True, lm_head_bias=True,
                      rms_norm_eps=1e-5, sliding_window=None,
                      rope_scaling={"rope_type": "longrope", "type": "longrope",
                                    "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                    "long_factor": [2.0 + 0.2 * i for i in range(8)],
                                    "short_mscale": 1.3, "long_mscale": 1.3,
                                    "original_max_position_embeddings": 256})
    elif arch != "llama":
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS + EXTRA_ARCHS}")
    config_class = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                    "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                    "phi3": "Phi3Config", "mixtral": "MixtralConfig",
                    "qwen3_moe": "Qwen3MoeConfig", "granite": "GraniteConfig",
                    "olmo2": "Olmo2Config", "gemma3": "Gemma3TextConfig",
                    "qwen2_moe": "Qwen2MoeConfig", "gpt_oss": "GptOssConfig",
                    "llama_bias": "LlamaConfig", "smollm3": "SmolLM3Config",
                    "exaone4": "Exaone4Config", "seed_oss": "SeedOssConfig",
                    "ministral": "MinistralConfig", "ernie4_5": "Ernie4_5Config",
                    "glm": "GlmConfig", "glm4": "Glm4Config",
                    "hunyuan": "HunYuanDenseV1Config", "arcee": "ArceeConfig",
                    "nemotron": "NemotronConfig", "starcoder2": "Starcoder2Config",
                    "cohere": "CohereConfig", "cohere2": "Cohere2Config",
                    "glm4_moe": "Glm4MoeConfig", "olmo3": "Olmo3Config",
                    "olmoe": "OlmoeConfig", "minimax_m2": "MiniMaxM2Config",
                    "ernie4_5_moe": "Ernie4_5_MoeConfig",
                    "hunyuan_moe": "HunYuanMoEV1Config", "dots1": "Dots1Config",
                    "apertus": "ApertusConfig", "phi": "PhiConfig", "phi2": "PhiConfig",
                    "stablelm": "StableLmConfig", "stablelm_parallel": "StableLmConfig",
                    "stablelm_qk": "StableLmConfig",
                    "olmo": "OlmoConfig", "helium": "HeliumConfig",
                    "gpt_neox": "GPTNeoXConfig", "gpt_neox_sequential": "GPTNeoXConfig",
                    "phimoe": "PhimoeConfig"}[arch]
    common.update(overrides)
    return getattr(transformers, config_class)(**common)


def _correction_bias(arch: str, moe: torch.nn.Module) -> torch.Tensor:
    """Where HF keeps a sparse block's expert-score correction bias."""
    if arch in ("glm4_moe", "dots1"):
        return moe.gate.e_score_correction_bias
    if arch == "ernie4_5_moe":  # in the router from transformers 5, beside it before
        statics = moe.moe_statics if hasattr(moe, "moe_statics") else moe.gate.moe_statics
        return statics.e_score_correction_bias
    return moe.e_score_correction_bias


@torch.no_grad()
def _reinit_(model: PreTrainedModel, seed: int, std: float) -> None:
    """Large-std init so logits are peaky and greedy argmax has clear margins (no flaky ties)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # deduplicates tied weights
        if "norm" in name:
            p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen))


def _save_bin(model: PreTrainedModel, out_dir: Path, max_shard_bytes: int | None) -> None:
    """transformers 5 only writes safetensors; write the legacy pytorch_model*.bin layout by hand."""
    model.config.save_pretrained(str(out_dir))
    if model.can_generate():
        model.generation_config.save_pretrained(str(out_dir))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if max_shard_bytes is None:
        torch.save(sd, out_dir / "pytorch_model.bin")
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        torch.save(shard, out_dir / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


SHARD_BYTES = 200_000  # a ~0.6 MB tiny model splits into 3-4 shards


def make_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    sharded: bool = False,
    safetensors: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random HF checkpoint (config, weights, tokenizer) to ``out_dir``; return it.

    ``rope_scaling`` uses the legacy key; transformers 5 stores it as ``rope_parameters``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    config = _arch_config(
        arch,
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_scaling=rope_scaling,
        overrides=config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed, init_std)
    if arch in ("glm4_moe", "minimax_m2", "ernie4_5_moe", "dots1"):  # a correction bias
        gen = torch.Generator().manual_seed(seed + 1)  # that changes which experts are chosen
        with torch.no_grad():
            for layer in model.model.layers[0 if arch == "minimax_m2" else 1:]:
                bias = _correction_bias(arch, layer.mlp)
                # (softmax scores are ~1/E: a smaller bias still changes the choice)
                scale = 0.05 if arch == "ernie4_5_moe" else 0.3
                bias.copy_(scale * torch.randn(bias.shape, generator=gen))
    if arch == "gpt_oss":  # transformers < 5 clamps at 7.0 whatever swiglu_limit says: the
        # checkpoint then says what HF computes (real gpt-oss configs say 7.0)
        model.config.swiglu_limit = model.model.layers[0].mlp.experts.limit
    model = model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    if safetensors:
        kwargs: dict[str, Any] = {"max_shard_size": SHARD_BYTES} if sharded else {}
        model.save_pretrained(str(out_dir), **kwargs)
    else:
        _save_bin(model, out_dir, SHARD_BYTES if sharded else None)
    return out_dir


def _normalize_targets(target_modules: str | Sequence[str]) -> str | list[str]:
    """PEFT takes a regex/"all-linear" string as-is, or a list of module-name suffixes."""
    if isinstance(target_modules, str):
        return target_modules
    return list(target_modules)


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    target_parameters: Sequence[str] | None = None,
    modules_to_save: Sequence[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    seed: int = 1,
    scale: float = 0.3,
    safetensors: bool = True,
) -> Path:
    """Create a PEFT LoRA adapter for ``base_dir`` with random non-zero A and B; return ``out_dir``.

    PEFT inits lora_B to zero (a no-op adapter), so both A and B (and lora_bias's bias on
    B) are re-drawn ~ N(0, scale);
    the copies of `modules_to_save` get noise of `scale` times their spread, and DoRA's
    magnitudes (||W|| at init) a random 20% up or down per row.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        target_modules=_normalize_targets(target_modules),
        **({"target_parameters": list(target_parameters)} if target_parameters else {}),
        **({"modules_to_save": list(modules_to_save)} if modules_to_save else {}),
        use_rslora=use_rslora,
        use_dora=use_dora,
        **({"lora_bias": True} if lora_bias else {}),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        lora_dropout=0.0,
        bias="none",
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"\.lora_(?:embedding_)?[AB]\.", name):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
                n += 1
            elif ".modules_to_save." in name:  # a fully trained copy: moved off the base
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.2 * (2 * torch.rand(p.shape, generator=gen) - 1))
    if n == 0:
        raise ValueError(f"target_modules={target_modules!r} matched no module in {base_dir}")
    model.save_pretrained(str(out_dir), safe_serialization=safetensors)
    return out_dir


@functools.lru_cache(maxsize=64)
def _load_cached(
    base_dir: str, adapter_dir: str | None, _stamp: tuple[int, ...] = ()
) -> torch.nn.Module:
    base = Path(base_dir)
    if base.suffix == ".gguf":  # a GGUF base (tests/gguf_fixtures.py): HF's own GGUF reading
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(  # eager: Gemma 2
            str(base.parent), gguf_file=base.name, dtype=torch.float32,  # (see below)
            attn_implementation="eager")
    else:
        # Gemma 2 caps attention scores, which only HF's eager attention does (transformers
        # 4.x picks SDPA for it and drops the cap; 5.x picks eager)
        eager = json.loads((base / "config.json").read_text()).get("model_type") == "gemma2"
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, **({"attn_implementation": "eager"} if eager else {}))
    if adapter_dir is not None:
        from peft import PeftModel

        vocab = _adapter_vocab(Path(adapter_dir))
        if vocab > model.get_input_embeddings().num_embeddings:  # it adds tokens: resized rows
            model.resize_token_embeddings(vocab, mean_resizing=False)

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model


def _adapter_vocab(adapter_dir: Path) -> int:
    """The vocabulary an adapter was trained with: its tokenizer's, if it ships one."""
    if not (adapter_dir / "tokenizer_config.json").exists():
        return 0
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(adapter_dir)))


def edited_copy(src: Path, dst: Path, edit: Any = None, *, tensors: Any = None,
                config: str = "adapter_config.json",
                weights: str = "adapter_model.safetensors") -> Path:
    """A copy of a model or adapter directory with its JSON `config` file changed in place
    by `edit` (a function of the dict) and its `weights` file passed through `tensors` (a
    function of the tensor dict): how tests make a broken or altered checkpoint."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / config).read_text())
        edit(cfg)
        (dst / config).write_text(json.dumps(cfg))
    if tensors is not None:
        path = str(dst / weights)
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    return dst


def add_tokens_to_model(path: Path, tokens: Sequence[str], *, special: bool = False,
                        seed: int = 0) -> list[int]:
    """Give the tiny model at `path` (in place) `tokens` as the ids after its vocabulary
    (special tokens or plain), their embedding and lm_head rows random (std 0.2, as the
    rest); returns their ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    first = len(tok)
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    else:
        tok.add_tokens(list(tokens))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in {id(t): t for t in (model.get_input_embeddings().weight,
                                         model.get_output_embeddings().weight)}.values():
            table[first:] = 0.2 * torch.randn(table[first:].shape, generator=gen)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return tok.convert_tokens_to_ids(list(tokens))


def make_added_tokens_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    new_tokens: Sequence[str] = ("<tool>", "<think>", "<end_think>"),
    mode: str = "resized",
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 5,
    scale: float = 0.3,
    row_std: float = 1.0,
) -> Path:
    """A PEFT LoRA adapter trained after ``tokenizer.add_tokens(new_tokens)`` and
    ``resize_token_embeddings``, saved as PEFT saves it, with its tokenizer. The added
    tokens' rows are drawn with ``row_std`` (large next to the base's, so greedy decoding
    picks them often). ``mode``:

    - "resized": the rows live in the resized embed_tokens / lm_head PEFT saves whole;
    - "trainable_tokens": PEFT's ``trainable_token_indices`` over the added ids;
    - "vocab_lora": LoRA on embed_tokens and lm_head too, over the resized layers (its
      columns / rows of the added tokens included);
    - "modules_to_save": the resized layers fully trained (PEFT's modules_to_save, as
      LLaMA-Factory's resize_vocab saves them): their base rows moved too.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base_vocab = AutoModelForCausalLM.from_pretrained(str(base_dir)).config.vocab_size
    tok.add_tokens(list(new_tokens))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    new = torch.arange(base_vocab, len(tok))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        emb.weight[new] = row_std * torch.randn(len(new), emb.weight.shape[1], generator=gen)
        if head.weight is not emb.weight:
            head.weight[new] = row_std * torch.randn(len(new), head.weight.shape[1],
                                                     generator=gen)
    targets = list(target_modules) + (["embed_tokens", "lm_head"] if mode == "vocab_lora" else [])
    extra: dict[str, Any] = {}
    if mode == "trainable_tokens":
        extra["trainable_token_indices"] = new.tolist()
    elif mode == "modules_to_save":
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif mode not in ("resized", "vocab_lora"):
        raise ValueError(f"unknown mode {mode!r}")
    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=targets,
                     lora_dropout=0.0, bias="none", **extra)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if re.search(r"\.lora_(?:embedding_)?[AB]\.", name):
                p.copy_(scale * torch.randn(p.shape, generator=gen))
            elif "trainable_tokens_delta" in name:  # the trained rows themselves
                p.copy_(row_std * torch.randn(p.shape, generator=gen))
            elif ".modules_to_save." in name:  # the base rows trained as well
                p[:base_vocab] += scale * p[:base_vocab].std() * torch.randn(
                    base_vocab, p.shape[1], generator=gen)
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def _stamp(*dirs: Path | None) -> tuple[int, ...]:
    """Config mtimes in the cache key, so a checkpoint rewritten in place is reloaded."""
    out: list[int] = []
    for d in dirs:
        if d is None:
            continue
        if d.is_file():  # a GGUF base
            out.append(d.stat().st_mtime_ns)
            continue
        for name in ("config.json", "adapter_config.json"):
            f = d / name
            if f.exists():
                out.append(f.stat().st_mtime_ns)
    return tuple(out)


def load_hf_model(base_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """HF (+PEFT) reference model in fp32, cached per (base, adapter). Do not mutate it."""
    base = Path(base_dir).resolve()
    adapter = None if adapter_dir is None else Path(adapter_dir).resolve()
    return _load_cached(str(base), None if adapter is None else str(adapter), _stamp(base, adapter))


@torch.no_grad()
def hf_greedy(
    base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy continuation of exactly ``max_new_tokens`` ids (EOS does not stop it), no padding."""
    model = load_hf_model(base_dir, adapter_dir)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out: list[int] = []
    past = None
    step_in = ids
    for _ in range(max_new_tokens):
        res = model(input_ids=step_in, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].float().argmax())
        out.append(nxt)
        step_in = torch.tensor([[nxt]], dtype=torch.long)
    return out


@torch.no_grad()
def hf_logprobs(base_dir: Path, adapter_dir: Path | None, token_ids: list[int]) -> torch.Tensor:
    """log_softmax over the vocab at every position of ``token_ids``: [len, V] fp32.

    Row i is the distribution of the token *after* position i (i.e. predicts token_ids[i+1]).
    """
    model = load_hf_model(base_dir, adapter_dir)
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_greedy_close(
    actual_ids: Sequence[int],
    base_dir: Path,
    adapter_dir: Path | None,
    prompt_ids: Sequence[int],
    *,
    tie_tol: float = 1e-3,
) -> None:
    """Assert every token in ``actual_ids`` is the reference's greedy pick given its own prefix.

    Teacher-forces prompt + actual through the reference; a different pick is tolerated only
    where the reference's top-2 log-probs are within ``tie_tol`` (a genuine near-tie), so
    comparisons stay strict without flaking on fp32 rounding.
    """
    actual = [int(t) for t in actual_ids]
    if not actual:
        return
    prompt = [int(t) for t in prompt_ids]
    lp = hf_logprobs(base_dir, adapter_dir, prompt + actual)[len(prompt) - 1 : -1]
    for i, tok in enumerate(actual):
        best = int(lp[i].argmax())
        if tok != best:
            gap = float(lp[i, best] - lp[i, tok])
            if gap >= tie_tol:
                raise AssertionError(
                    f"step {i}: got token {tok}, reference greedy {best} "
                    f"(logprob gap {gap:.4g} >= tie_tol {tie_tol}); actual={actual}"
                )


def quantized_copy(src: Path, dst: Path, quant_method: str) -> Path:
    """A copy of a tiny model whose config.json says it is quantized (its weights are
    still plain): what a GPTQ/AWQ/... checkpoint looks like to the config check."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": quant_method, "bits": 4, "group_size": 128}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst

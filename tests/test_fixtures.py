"""Sanity checks on the shared fixtures, so a broken reference fails loudly and early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ADAPTER_SPECS
from tests.fixtures import (
    ARCHS,
    assert_greedy_close,
    hf_greedy,
    hf_logprobs,
    make_peft_adapter,
    make_tiny_model,
)

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def test_tokenizer_round_trip(tiny_models: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    assert 400 <= len(tok) <= 600
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    for text in ["Hello, world!", " two  spaces\tand\ttabs\n", "naïve café — 你好 🤖", ""]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>hi\n<|assistant|>"


@pytest.mark.parametrize("arch", ARCHS)
def test_models_load(arch: str, tiny_models: dict[str, Path], prompts: list[list[int]]) -> None:
    d = tiny_models[arch]
    model = AutoModelForCausalLM.from_pretrained(str(d))
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size == len(AutoTokenizer.from_pretrained(str(d)))
    assert (d / "model.safetensors").is_file()
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    lp = hf_logprobs(d, None, prompts[2])
    assert lp.shape == (len(prompts[2]), cfg.vocab_size) and lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(-1), torch.ones(len(prompts[2])), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_consistent_with_logprobs(
    arch: str, tiny_models: dict[str, Path], prompts: list[list[int]]
) -> None:
    d = tiny_models[arch]
    for p in prompts:
        out = hf_greedy(d, None, p, 12)
        assert len(out) == 12
        assert_greedy_close(out, d, None, p, tie_tol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_change_greedy(
    arch: str,
    tiny_models: dict[str, Path],
    tiny_adapters: dict[str, dict[str, Path]],
    prompts: list[list[int]],
) -> None:
    base = tiny_models[arch]
    assert set(tiny_adapters[arch]) == set(ADAPTER_SPECS)
    p = prompts[2]
    base_out = hf_greedy(base, None, p, 16)
    outs = {}
    for name, ad in tiny_adapters[arch].items():
        assert (ad / "adapter_config.json").is_file()
        assert (ad / "adapter_model.safetensors").is_file()
        out = hf_greedy(base, ad, p, 16)
        assert out != base_out, f"{arch}/{name} does not change greedy output"
        outs[name] = tuple(out)
    assert len(set(outs.values())) == len(outs), "adapters should differ from each other"


def test_adapter_configs(tiny_adapters: dict[str, dict[str, Path]]) -> None:
    ads = tiny_adapters["llama"]
    cfg = json.loads((ads["r16_rslora"] / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 16
    cfg = json.loads((ads["r8_patterns"] / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"o_proj": 4} and cfg["alpha_pattern"] == {"v_proj": 32}
    cfg = json.loads((ads["r8_regex"] / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    cfg = json.loads((ads["r8_all"] / "adapter_config.json").read_text())
    # PEFT expands "all-linear" to the concrete module names when saving.
    assert "lm_head" not in cfg["target_modules"]


def test_variants(tmp_path: Path, prompts: list[list[int]]) -> None:
    sharded = make_tiny_model(tmp_path / "sharded", "llama", sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) >= 2

    binary = make_tiny_model(tmp_path / "bin", "llama", safetensors=False)
    assert (binary / "pytorch_model.bin").is_file()
    assert not list(binary.glob("*.safetensors"))

    bin_sharded = make_tiny_model(
        tmp_path / "bin_sharded", "llama", safetensors=False, sharded=True
    )
    assert (bin_sharded / "pytorch_model.bin.index.json").is_file()

    # Same seed, same weights, whatever the on-disk format.
    ref = make_tiny_model(tmp_path / "plain", "llama")
    p = prompts[1]
    want = hf_logprobs(ref, None, p)
    for d in (sharded, binary, bin_sharded):
        assert torch.equal(hf_logprobs(d, None, p), want)

    ad = make_peft_adapter(ref, tmp_path / "ad_bin", safetensors=False)
    assert (ad / "adapter_model.bin").is_file()
    assert hf_greedy(ref, ad, p, 8) != hf_greedy(ref, None, p, 8)


def test_tied_and_rope_scaling(tmp_path: Path) -> None:
    tied = make_tiny_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    m = AutoModelForCausalLM.from_pretrained(str(tied))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    d = make_tiny_model(tmp_path / "rope", "llama", rope_scaling=rope)
    cfg = AutoConfig.from_pretrained(str(d))
    params = getattr(cfg, "rope_parameters", None) or cfg.rope_scaling  # transformers 5 / 4.x
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0


def test_bf16_dtype(tmp_path: Path) -> None:
    d = make_tiny_model(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"

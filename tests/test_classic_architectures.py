"""The older decoder families of models/classic.py against HF transformers + PEFT (fp32),
each a mixed batch of the base and two adapters of different ranks over one slot, prompts
prefilled whole and in chunks:

- GPTBigCode (StarCoder 1): learned positions, multi-query attention fused in c_attn, or
  q/k/v per head without the 1/sqrt(d) scale; adapters on c_attn and on both c_proj (the
  attention's and the MLP's);
- Falcon: 7B's multi-query attention beside the MLP on one LayerNorm, 40B's KV groups
  fused per group with two LayerNorms, and sequential layers with q/k/v per head and
  biases, rotary or ALiBi (Falcon-RW: its slopes over sqrt(head_dim)); adapters on
  query_key_value, dense and the MLP's;
- OPT: learned positions at p + 2, ReLU, biases; adapters on q/k/v/out_proj, fc1, fc2
  and the embeddings; OPT-350m's post-LN layers without a final LayerNorm, its narrower
  embeddings and project_in / project_out (all-linear's targets too);
- GPT-J: parallel sublayers, rotary on interleaved pairs of part of each head, lm_head
  with a bias; adapters on q/k/v, out_proj, fc_in, fc_out, the embeddings and lm_head;
- CodeGen: GPT-J's layer, q/k/v fused in qkv_proj in 4 shards (each its heads' q, v, k);
  adapters on qkv_proj (one slice) and the rest;
- BLOOM: ALiBi over 6 heads (the Triton kernels' in tests/test_alibi.py), its embedding
  LayerNorm, q/k/v fused per head; adapters on query_key_value, dense and the MLP's;
- MPT: ALiBi with its own slopes, q/k/v fused in Wqkv and clamped, its softmax_scale, no
  biases; adapters on Wqkv, out_proj, up_proj, down_proj.

Their checkpoints' other shapes load (OPT's saved from OPTModel, GPT-J's with causal-mask
buffers); given embeddings (prompt_embeds) get the learned positions as in HF; what
loraplex does not do of them is refused before anything loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers

from loraplex.lora.request import LoRARequest
from loraplex.models.registry import build_model
from tests.classic_fixtures import CLASSIC_CONFIGS, has_config, make_classic_model
from tests.engine_utils import GREEDY, check_mixed_batch, make_llm
from tests.fixtures import edited_copy, hf_greedy, make_peft_adapter
from tests.test_prompt_embeds import GREEDY as EMBEDS_GREEDY
from tests.test_prompt_embeds import _check, _hf, _hf_greedy, _not_a_token

# variants of CLASSIC_CONFIGS' checkpoints: name -> (its arch, config overrides)
VARIANTS = {
    # OPT-350m: post-LN layers, embeddings narrower than the layers (project_in / _out)
    "opt_350m": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    # Falcon-RW (falcon-rw-1b): sequential layers, q/k/v per head, biases, ALiBi over 16
    # heads (slopes 2^(-i/2): HF rounds them, and slope x position, to bfloat16)
    "falcon_rw": ("falcon_sequential", dict(alibi=True, num_attention_heads=16)),
}
ARCHS = [*CLASSIC_CONFIGS, *VARIANTS]
# per family: a low-rank adapter on part of the model, a higher-rank one on every linear
ADAPTERS = {
    "gpt_bigcode": {"r4": ["c_attn", "c_proj"], "r8": "all-linear"},
    "falcon": {"r4": ["query_key_value", "dense"], "r8": "all-linear"},
    "opt": {"r4": ["q_proj", "v_proj", "out_proj", "fc1", "embed_tokens"],
            "r8": "all-linear"},
    "gptj": {"r4": ["q_proj", "v_proj", "fc_in", "wte", "lm_head"], "r8": "all-linear"},
    "codegen": {"r4": ["qkv_proj", "fc_out"], "r8": "all-linear"},
    "bloom": {"r4": ["query_key_value", "dense"], "r8": "all-linear"},
    "mpt": {"r4": ["Wqkv", "down_proj"], "r8": "all-linear"},
}


def _adapters(arch: str) -> dict[str, dict]:
    family = next(f for f in ADAPTERS if arch.startswith(f))
    return {name: dict(r=int(name[1:]), lora_alpha=2 * int(name[1:]), target_modules=targets)
            for name, targets in ADAPTERS[family].items()}


@pytest.fixture(scope="module")
def models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    class Lazy(dict):
        def __missing__(self, arch: str) -> tuple[Path, dict[str, Path]]:
            config, overrides = VARIANTS.get(arch, (arch, {}))
            if not has_config(config):
                pytest.skip(f"this transformers ({transformers.__version__}) has no {arch}")
            root = tiny_root / "classic_archs"
            seed = 300 + ARCHS.index(arch)
            base = make_classic_model(root / arch, config, seed, **overrides)
            self[arch] = (base, {name: make_peft_adapter(base, root / f"{arch}_{name}",
                                                         seed=seed + i, **spec)
                                 for i, (name, spec) in enumerate(_adapters(arch).items())})
            return self[arch]
    return Lazy()


@pytest.mark.parametrize("budget", [None, 6])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft(arch, budget, models, prompts):
    base, adapters = models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   **({"enable_chunked_prefill": True, "max_num_batched_tokens": budget}
                      if budget else {}))
    check_mixed_batch(llm, base, adapters, prompts, extra=2)


PROMPT = [1, 43, 76, 9]


@pytest.mark.parametrize("arch", ["opt", "opt_350m", "gptj", "gpt_bigcode", "bloom"])
def test_older_checkpoint_names_load(arch, models, tmp_path, caplog):
    """OPT checkpoints saved from OPTModel (decoder.*, no model. prefix nor lm_head: it is
    tied; OPT-350m's decoder.project_in / project_out), BLOOM's from BloomModel
    (word_embeddings.*, h.*: no transformer. prefix);
    GPT-J's and GPTBigCode's with each layer's causal-mask buffers (attn.bias,
    attn.masked_bias), skipped without a warning: the same model."""
    base, _ = models[arch]

    def renamed(tensors: dict) -> dict:
        if arch in ("opt", "opt_350m", "bloom"):
            return {k.removeprefix("model.").removeprefix("transformer."): v
                    for k, v in tensors.items() if k != "lm_head.weight"}
        for i in range(2):
            tensors[f"transformer.h.{i}.attn.bias"] = torch.ones(
                1, 1, 8, 8, dtype=torch.bool).tril()
            tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
        return tensors

    def tied(cfg: dict) -> None:
        cfg["tie_word_embeddings"] = True

    copy = edited_copy(base, tmp_path / arch, tied if arch.startswith("opt") else None,
                       tensors=renamed, config="config.json", weights="model.safetensors")
    with caplog.at_level(logging.WARNING, logger="loraplex.models.loader"):
        out = make_llm(copy).generate([{"prompt_token_ids": PROMPT}], GREEDY,
                                      use_tqdm=False)[0].outputs[0].token_ids
    assert not [r for r in caplog.records if r.name == "loraplex.models.loader"]
    assert out == hf_greedy(copy, None, PROMPT, len(out))


def _config(name: str, **fields) -> object:
    """A tiny config of `name`'s architecture."""
    config_class, sizes = {
        "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2)),
        "opt": ("OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  ffn_dim=64)),
        "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=32, n_layer=2, n_head=2)),
        "codegen": ("CodeGenConfig", dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=4)),
        "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=2)),
    }[name]
    return getattr(transformers, config_class)(vocab_size=32, **sizes, **fields)


@pytest.mark.parametrize(("name", "fields", "match"), [
    ("codegen", {}, "n_head=2: .* must be a multiple of 4"),
    ("bloom", dict(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm=True is not supported"),
])
def test_unsupported_variants_are_refused(name, fields, match):
    """What HF's code does that loraplex does not (BLOOM's residual after its LayerNorm)
    and configs HF's layout cannot mean (CodeGen's heads in 4 shards) are refused at
    build, before any weight loads."""
    with pytest.raises(ValueError, match=match):
        build_model(_config(name, **fields))


def test_learned_positions_refuse_long_lora():
    """Long-context LoRA stretches rope tables; a learned position table has no rows past
    its size: refused, naming why."""
    with pytest.raises(ValueError, match="long-lora-scaling-factors: not supported on a "
                                         "model with learned absolute positions"):
        build_model(_config("gpt_bigcode"), long_lora_factors=(2.0,))


def test_config_fields_become_flags():
    """Each variant's config fields as loraplex reads them: GPTBigCode's one KV head
    (multi_query) or one per head, its unscaled scores; Falcon's KV heads and layout per
    variant."""
    mqa = build_model(_config("gpt_bigcode")).args
    assert (mqa.num_kv_heads, mqa.qkv_per_head, mqa.attention_multiplier) == (1, False, None)
    mha = build_model(_config("gpt_bigcode", multi_query=False,
                              scale_attn_weights=False)).args
    assert (mha.num_kv_heads, mha.qkv_per_head, mha.attention_multiplier) == (2, True, 1.0)
    falcon = {k: build_model(_config("falcon", **f)).args for k, f in {
        "7b": dict(multi_query=True, parallel_attn=True),
        "40b": dict(new_decoder_architecture=True, num_kv_heads=1),
        "rw": dict(multi_query=False, parallel_attn=False)}.items()}
    assert [(a.num_kv_heads, a.qkv_per_head, a.norm_layout) for a in falcon.values()] == [
        (1, False, "parallel"), (1, True, "parallel_two_norms"), (2, True, "pre")]


def test_opt_and_falcon_rw_flags():
    """OPT-350m's post-LN layers without a final norm, its narrower embeddings (both
    projections LoRA targets); a pre-LN OPT without its final norm
    (_remove_final_layer_norm); Falcon-RW's ALiBi (HF's slopes over sqrt(head_dim)), no
    rotary."""
    opt = build_model(_config("opt", do_layer_norm_before=False, word_embed_proj_dim=16))
    assert (opt.args.norm_layout, opt.args.final_norm, opt.args.word_embed_proj_dim) == (
        "post_ln", False, 16)
    assert {"project_in", "project_out"} <= set(opt.lora_target_modules)
    assert (opt.model.embed_tokens.weight.shape, opt.lm_head.weight.shape) == (
        (32, 16), (32, 16))
    plain = build_model(_config("opt")).args
    assert (plain.norm_layout, plain.final_norm, plain.word_embed_proj_dim) == (
        "pre", True, None)
    assert not build_model(_config("opt", _remove_final_layer_norm=True)).args.final_norm
    rw = build_model(_config("falcon", alibi=True, multi_query=False,
                             parallel_attn=False)).args
    assert (rw.alibi_slopes, rw.alibi_bf16_scale) == ((2 ** -4, 2 ** -8), 16 ** -0.5)
    assert rw.nope_layers == (0, 1)
    assert build_model(_config("falcon")).args.alibi_slopes is None


def test_projection_adapter_on_a_model_without_them(models):
    """An OPT-350m adapter on every linear (project_in / project_out too) loaded on an
    OPT whose embeddings are as wide as its layers (no projections): refused alone with
    a ValueError naming the module; the base still serves."""
    base, _ = models["opt"]
    _, adapters = models["opt_350m"]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    with pytest.raises(ValueError, match=r"target module .model\.decoder\.project_(in|out). not "
                                         "found in the model"):
        llm.generate([{"prompt_token_ids": PROMPT}], GREEDY,
                     lora_request=LoRARequest("r8", 1, str(adapters["r8"])), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(base, None, PROMPT, GREEDY.max_tokens)


@pytest.mark.parametrize("arch", ["gpt_bigcode", "opt", "opt_350m", "bloom"])
def test_given_embeddings_are_treated_as_hf_treats_them(arch, models):
    """prompt_embeds on a model with learned positions: its position rows are added to the
    given embeddings as HF adds them to inputs_embeds (adapter and all); on BLOOM its
    embedding LayerNorm normalizes them, as HF's; on OPT-350m they are as narrow as its
    embeddings, project_in widens them (a row as wide as its layers is refused)."""
    base, adapters = models[arch]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   enable_prompt_embeds=True)
    e = _not_a_token(_hf(base), [1, 43, 76, 99, 12, 57, 8], seed=7)
    out = llm.generate([{"prompt_embeds": e}], EMBEDS_GREEDY,
                       lora_request=LoRARequest("r8", 1, str(adapters["r8"])),
                       use_tqdm=False)[0]
    _check(out, _hf_greedy(_hf(base, adapters["r8"]), e, EMBEDS_GREEDY.max_tokens))
    if arch == "opt_350m":
        wide = torch.zeros(3, llm.llm_engine.model.args.hidden_size)
        with pytest.raises(ValueError, match="prompt_embeds"):
            llm.generate([{"prompt_embeds": wide}], EMBEDS_GREEDY, use_tqdm=False)


def test_opt_350m_added_tokens_and_whole_tables(models, tmp_path, prompts):
    """OPT-350m's embeddings are narrower than its layers: an adapter's added tokens (its
    resized tables) and whole embed_tokens / lm_head tables (modules_to_save, tokens
    added too) are rows of the embedding's width; in one batch with the base, over one
    slot, each equals HF + PEFT on the resized model."""
    from tests.engine_utils import check_against_hf
    from tests.fixtures import make_added_tokens_adapter
    from tests.test_added_tokens import _prompt_with_added

    base, _ = models["opt_350m"]
    adapters = {"resized": make_added_tokens_adapter(base, tmp_path / "resized", seed=61),
                "whole": make_added_tokens_adapter(base, tmp_path / "whole", seed=62,
                                                   mode="modules_to_save",
                                                   new_tokens=("<a>", "<b>"))}
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8,
                   enable_lora_modules_to_save=True)
    names = ["resized", None, "whole"]
    batch = [_prompt_with_added(prompts[0], 3), prompts[1], _prompt_with_added(prompts[2], 2)]
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY,
                        lora_request=[LoRARequest(n, i + 1, str(adapters[n])) if n else None
                                      for i, n in enumerate(names)], use_tqdm=False)
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


def test_biased_lm_head_refuses_whole_tables(models):
    """GPT-J's lm_head has a bias: whole lm_head tables per adapter (modules_to_save) are
    refused at start-up, as on Phi."""
    base, _ = models["gptj"]
    with pytest.raises(ValueError, match="--enable-lora-modules-to-save is not supported on "
                                         "a model whose lm_head has a bias"):
        make_llm(base, enable_lora=True, enable_lora_modules_to_save=True,
                 lora_target_modules=["q_proj", "embed_tokens", "lm_head"])

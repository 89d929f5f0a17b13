"""Gemma 4's text model (models/gemma4.py) against HF transformers + PEFT, fp32, on a tiny
random checkpoint (tests/gemma4_fixtures.py) with sliding and full layers of their own
shapes, values = keys, KV sharing, per-layer embeddings and experts beside the MLP:
mixed batches of the base and adapters of two ranks, a chunked prefill decoding past the
window, the prefix cache, the KV budget, the Gemma4ForConditionalGeneration layout served
on text over HTTP, and bad input refused alone."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("transformers.models.gemma4",
                    reason="transformers < 5.5 has no Gemma 4 (the floors' 4.56)")

from loraplex import LoRARequest, SamplingParams  # noqa: E402
from tests.engine_utils import (  # noqa: E402
    GREEDY,
    check_against_hf,
    check_mixed_batch,
    check_prefix_cache_repeat,
    lora_requests,
    make_llm,
)
from tests.fixtures import (  # noqa: E402
    SAMPLE_SENTENCES,
    hf_greedy,
    load_tokenizer,
    make_added_tokens_adapter,
    make_peft_adapter,
)
from tests.gemma4_fixtures import WINDOW, as_conditional_generation, make_gemma4  # noqa: E402
from tests.multimodal_fixtures import check_media_refused  # noqa: E402
from tests.server_utils import RemoteServer, token_ids_of  # noqa: E402

# every module PEFT can put a LoRA on in Gemma 4's decoder but the router's proj
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    base = make_gemma4(root / "base")
    adapters = {
        "r8_all": make_peft_adapter(base, root / "r8_all", r=8, target_modules=ALL_TARGETS,
                                    target_parameters=["experts.gate_up_proj",
                                                       "experts.down_proj"], seed=2),
        "r4_qv": make_peft_adapter(base, root / "r4_qv", r=4, seed=3),
    }
    return {"base": base, "adapters": adapters, "root": root}


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer()
    return [tok.encode(s) for s in SAMPLE_SENTENCES[1:]]


@pytest.fixture(scope="module")
def llm(gemma4):
    # 16 tokens a step: the longer prompts prefill in chunks; block size 8
    return make_llm(gemma4["base"], enable_lora=True, max_loras=2, max_lora_rank=16,
                    block_size=8, max_num_batched_tokens=16, max_num_seqs=8,
                    enable_prefix_caching=True)


def test_mixed_batch_matches_hf(llm, gemma4, prompts):
    """The base, a rank-8 adapter on every projection (the per-layer embeddings' and the
    experts' too) and a rank-4 one on q/v in one batch, the longer prompts prefilled in
    chunks: HF + PEFT's greedy tokens, logprobs within 1e-4."""
    assert max(len(p) for p in prompts) > 16 + WINDOW  # chunked, and past the window
    check_mixed_batch(llm, gemma4["base"], gemma4["adapters"], prompts)


def test_decode_past_window_after_chunked_prefill(llm, gemma4, prompts):
    """A prompt prefilled in 16-token chunks, then 24 tokens decoded (well past the sliding
    window of 6, through the shared layers reading the stored ones' cache)."""
    reqs = lora_requests(gemma4["adapters"])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": prompts[-1]}] * 2, params,
                        lora_request=[None, reqs["r8_all"]], use_tqdm=False)
    check_against_hf(outs, gemma4["base"], [None, gemma4["adapters"]["r8_all"]],
                     [prompts[-1]] * 2)


def test_dense_model_without_shared_values(gemma4, prompts):
    """E2B's shape: no experts, every layer with its v_proj (attention_k_eq_v off, the
    full layers still of their own shape), KV sharing and per-layer embeddings: the base
    and a q/v adapter in one batch, as HF + PEFT."""
    base = make_gemma4(gemma4["root"] / "dense", seed=5, enable_moe_block=False,
                       attention_k_eq_v=False)
    adapter = make_peft_adapter(base, gemma4["root"] / "dense_qv", r=4, seed=6)
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8)
    assert not llm.llm_engine.model.args.host_routed  # (decode graphs, on a GPU)
    req = lora_requests({"qv": adapter})["qv"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]] * 2, GREEDY,
                        lora_request=[None, None, req, req], use_tqdm=False)
    check_against_hf(outs, base, [None, None, adapter, adapter], prompts[:2] * 2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_backend_matches_hf(monkeypatch, gemma4, prompts):
    """The Triton attention kernels (interpreted on the CPU, compiled on CUDA) over the
    layers' own shapes and the shared caches, chunked prefill and decode past the window:
    HF + PEFT's tokens."""
    from tests.triton_compile import import_kernels, interpret_triton_language

    if not torch.cuda.is_available():  # (as tests/test_attention.py runs them)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpret_triton_language()
    kernels = import_kernels("loraplex.layers.triton_attention")
    if not torch.cuda.is_available() and not kernels._INTERPRETED:
        pytest.skip("Triton runs here only on a GPU or under TRITON_INTERPRET=1")
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    llm = make_llm(gemma4["base"], enable_lora=True, max_loras=2, max_lora_rank=16,
                   block_size=8, max_num_batched_tokens=16)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    reqs = lora_requests(gemma4["adapters"])
    batch = [prompts[-1], prompts[1], prompts[-1]]
    names = [None, "r4_qv", "r8_all"]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    check_against_hf(outs, gemma4["base"],
                     [gemma4["adapters"][n] if n else None for n in names], batch)


def test_prefix_cache_repeat_equals_fresh(llm, gemma4, prompts):
    """A prompt seen before starts from its cached blocks and gives what it gave fresh."""
    check_prefix_cache_repeat(llm, gemma4["base"], gemma4["adapters"], "r4_qv",
                              prompts[-2] + prompts[0][1:], 8)


def test_kv_cache_counts_only_storing_layers(llm):
    """The KV budget pays for the two layers that keep a cache (a sliding one: 2 heads of
    16; a full one: 1 head of 32), not the two that reuse theirs, which attend over the
    same tensors."""
    engine = llm.llm_engine
    block = engine.memory.block_size
    assert engine.memory.kv_block_bytes == 2 * block * 4 * (2 * 16 + 1 * 32)
    attns = [layer.self_attn.attn for layer in engine.model.model.layers]
    assert [a.reads_kv_of for a in attns] == [None, None, attns[0], attns[1]]
    for reuser, source in ((attns[2], attns[0]), (attns[3], attns[1])):
        assert reuser.k_cache is source.k_cache and reuser.v_cache is source.v_cache
    assert attns[0].k_cache.shape[2:] == (2, 16) and attns[1].k_cache.shape[2:] == (1, 32)


def test_kv_budget_holds_blocks_of_the_storing_layers(gemma4):
    """A budget of 40 blocks' bytes at what the two storing layers need per block gives 40
    blocks (counting all four layers would give 20), each 8 tokens."""
    per_block = 2 * 8 * 4 * (2 * 16 + 1 * 32)
    llm = make_llm(gemma4["base"], block_size=8, max_model_len=64,
                   kv_cache_memory_bytes=40 * per_block + 100)
    assert llm.llm_engine.model_runner.num_blocks == 40
    assert llm.llm_engine.model.model.layers[0].self_attn.attn.k_cache.shape[0] == 40


def test_prompt_embeds_refused(gemma4, prompts):
    """prompt_embeds have no token ids for the per-layer embeddings: refused alone."""
    llm = make_llm(gemma4["base"], enable_prompt_embeds=True, max_model_len=64)
    with pytest.raises(ValueError, match="per-layer embeddings"):
        llm.generate([{"prompt_embeds": torch.zeros(3, 64)}], SamplingParams(max_tokens=2),
                     use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_bad_requests_fail_alone(llm, gemma4, prompts, tmp_path):
    """An adapter of a rank above max_lora_rank, one that adds tokens (which have no
    per-layer embedding rows), an image: each refused, the engine serving on."""
    big = make_peft_adapter(gemma4["base"], tmp_path / "r32", r=32, seed=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("big", 9, str(big)), use_tqdm=False)
    added = make_added_tokens_adapter(gemma4["base"], tmp_path / "added")
    with pytest.raises(ValueError, match="lora_extra_vocab_size=0"):  # no per-layer rows
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("added", 10, str(added)), use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate([{"prompt_token_ids": prompts[0],
                       "multi_modal_data": {"image": torch.zeros(3, 8, 8)}}],
                     SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompts[0]}],
                       SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.fixture(scope="module")
def server(gemma4):
    """The same weights saved as Gemma4ForConditionalGeneration, served on text."""
    mm = as_conditional_generation(gemma4["base"], gemma4["root"] / "conditional")
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={gemma4['adapters']['r8_all']}"]
    env = {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with RemoteServer(mm, args, env=env) as s:
        yield s, str(mm)


def test_server_conditional_generation_on_text(server, gemma4, prompts, tmp_path):
    """Completions on the base and the adapter (HF + PEFT's tokens on the text
    checkpoint, the same weights); an image in a chat message, and an adapter of a rank
    above --max-lora-rank, are 400s alone, the server carrying on."""
    server, base = server
    client = server.get_client()
    for model, adapter in ((base, None), ("r8", gemma4["adapters"]["r8_all"])):
        r = client.completions.create(model=model, prompt=prompts[0], max_tokens=6,
                                      temperature=0, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True})
        assert token_ids_of(r.choices[0].logprobs) == hf_greedy(gemma4["base"], adapter,
                                                                prompts[0], 6), model
    check_media_refused(client, base)
    big = make_peft_adapter(gemma4["base"], tmp_path / "r32", r=32, seed=4)
    r = server.post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(big)})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"], r.text
    r = client.completions.create(model="r8", prompt=prompts[1], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"

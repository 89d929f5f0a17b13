"""Gemma 3n's text model (models/gemma3n.py) against HF transformers + PEFT, fp32, on a
tiny random checkpoint (tests/gemma3n_fixtures.py) with AltUp, LAuReL, per-layer
embeddings (some token ids past their table), activation sparsity on two layers, KV
sharing and a sliding window smaller than the prompts: mixed batches of the base and
adapters of three ranks (more than max_loras), chunked prefill, the prefix cache on and
off, the KV budget, the Gemma3nForConditionalGeneration layout served on text over HTTP,
and bad input refused alone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.gemma3n",
                    reason="transformers < 4.53 has no Gemma 3n")

from loraplex import LoRARequest, SamplingParams  # noqa: E402
from loraplex.models.gemma3n import gaussian_cutoff  # noqa: E402
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
from tests.gemma3n_fixtures import (  # noqa: E402
    HF_KV_SHARING,
    PLE_MISSING,
    WINDOW,
    as_conditional_adapter,
    as_conditional_generation,
    make_gemma3n,
)
from tests.multimodal_fixtures import check_media_refused  # noqa: E402
from tests.server_utils import RemoteServer, token_ids_of  # noqa: E402

# (transformers 4.56: see tests/gemma3n_fixtures.py; the rest runs without KV sharing)
needs_hf_kv_sharing = pytest.mark.skipif(
    not HF_KV_SHARING, reason="transformers < 5's Gemma 3n runs its KV-sharing layers' own "
    "K/V without a cache, and fails on token ids past the per-layer table")

# every module of Gemma 3n's decoder loraplex serves a LoRA on
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection",
               "linear_left", "linear_right")


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3n")
    base = make_gemma3n(root / "base")
    adapters = {
        "r8_all": make_peft_adapter(base, root / "r8_all", r=8, target_modules=ALL_TARGETS,
                                    seed=2),
        "r4_qv": make_peft_adapter(base, root / "r4_qv", r=4, seed=3),
        "r6_mlp": make_peft_adapter(base, root / "r6_mlp", r=6, seed=4, target_modules=(
            "gate_proj", "up_proj", "down_proj", "linear_left", "linear_right")),
    }
    return {"base": base, "adapters": adapters, "root": root}


@pytest.fixture(scope="module")
def prompts():
    tok = load_tokenizer()
    return [tok.encode(s) for s in SAMPLE_SENTENCES[1:]]


@pytest.fixture(scope="module")
def llm(gemma3n):
    # 16 tokens a step: the longer prompts prefill in chunks; block size 8; two adapter
    # slots for three adapters
    return make_llm(gemma3n["base"], enable_lora=True, max_loras=2, max_lora_rank=16,
                    block_size=8, max_num_batched_tokens=16, max_num_seqs=8,
                    enable_prefix_caching=True)


def test_mixed_batch_matches_hf(llm, gemma3n, prompts):
    """The base and adapters of ranks 8 (every served projection: LAuReL's and the
    per-layer embeddings' too), 4 (q/v) and 6 (MLP and LAuReL) in one batch over two
    slots, the longer prompts prefilled in chunks past the window: HF + PEFT's greedy
    tokens, logprobs within 1e-4."""
    assert max(len(p) for p in prompts) > 16 + WINDOW  # chunked, and past the window
    check_mixed_batch(llm, gemma3n["base"], gemma3n["adapters"], prompts)


def test_decode_past_window_after_chunked_prefill(llm, gemma3n, prompts):
    """A prompt prefilled in 16-token chunks, then 24 tokens decoded (past the window of
    6, through the shared layers reading the storing ones' cache)."""
    reqs = lora_requests(gemma3n["adapters"])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": prompts[-1]}] * 2, params,
                        lora_request=[None, reqs["r8_all"]], use_tqdm=False)
    check_against_hf(outs, gemma3n["base"], [None, gemma3n["adapters"]["r8_all"]],
                     [prompts[-1]] * 2)


def test_no_prefix_cache_and_ids_past_the_per_layer_table(gemma3n, prompts):
    """Prefix caching off, prompts holding the token ids that have no per-layer embedding
    row (HF reads row 0 for them; not on transformers < 5, whose model fails on them):
    the base and the rank-8 adapter as HF + PEFT."""
    vocab = len(load_tokenizer())
    tail = list(range(vocab - PLE_MISSING, vocab)) or prompts[1][1:6]
    batch = [prompts[0] + tail, tail + prompts[2], prompts[0] + tail]
    llm = make_llm(gemma3n["base"], enable_lora=True, max_loras=1, max_lora_rank=8,
                   block_size=8, max_num_batched_tokens=16, enable_prefix_caching=False)
    req = lora_requests(gemma3n["adapters"])["r8_all"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[None, req, req], use_tqdm=False)
    adapter = gemma3n["adapters"]["r8_all"]
    check_against_hf(outs, gemma3n["base"], [None, adapter, adapter], batch)


def test_prefix_cache_repeat_equals_fresh(llm, gemma3n, prompts):
    """A prompt seen before starts from its cached blocks and gives what it gave fresh."""
    check_prefix_cache_repeat(llm, gemma3n["base"], gemma3n["adapters"], "r4_qv",
                              prompts[-2] + prompts[0][1:], 8)


@needs_hf_kv_sharing
def test_kv_cache_counts_only_storing_layers(llm):
    """The KV budget pays for the three layers that keep a cache (2 heads of 16 each), not
    the two that reuse layers 1's and 2's, which attend over the same tensors."""
    engine = llm.llm_engine
    block = engine.memory.block_size
    assert engine.memory.kv_block_bytes == 2 * block * 4 * 3 * (2 * 16)
    attns = [layer.self_attn.attn for layer in engine.model.model.layers]
    assert [a.reads_kv_of for a in attns] == [None, None, None, attns[1], attns[2]]
    for reuser, source in ((attns[3], attns[1]), (attns[4], attns[2])):
        assert reuser.k_cache is source.k_cache and reuser.v_cache is source.v_cache


def test_other_active_stream_without_sharing(gemma3n, prompts):
    """AltUp over 4 streams computing on the second (altup_active_idx 1), the corrected
    output unscaled, no KV sharing, sparsity on the last layer only: the base and a
    rank-4 adapter as HF + PEFT."""
    base = make_gemma3n(gemma3n["root"] / "active1", seed=5, altup_num_inputs=4,
                        altup_active_idx=1, altup_correct_scale=False, num_kv_shared_layers=0,
                        activation_sparsity_pattern=[0.0] * 4 + [0.8])
    adapter = make_peft_adapter(base, gemma3n["root"] / "active1_qv", r=4, seed=6,
                                target_modules=("q_proj", "v_proj", "per_layer_input_gate"))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8)
    assert llm.llm_engine.model.model.layers[4].self_attn.attn.reads_kv_of is None
    req = lora_requests({"qv": adapter})["qv"]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]] * 2, GREEDY,
                        lora_request=[None, None, req, req], use_tqdm=False)
    check_against_hf(outs, base, [None, None, adapter, adapter], prompts[:2] * 2)


def test_gaussian_cutoff():
    """The sparsity cutoff is the standard normal's quantile (0.95: 1.6449 stds)."""
    assert abs(gaussian_cutoff(0.95) - 1.6448536) < 1e-6
    assert abs(gaussian_cutoff(0.5)) < 1e-6


def test_bad_requests_fail_alone(llm, gemma3n, prompts, tmp_path):
    """An adapter of a rank above max_lora_rank, one on AltUp's linears (PEFT's
    all-linear), one that adds tokens (no per-layer rows), an image, prompt_embeds: each
    refused with its reason, the engine serving on."""
    base = gemma3n["base"]
    one = [{"prompt_token_ids": prompts[0]}]
    big = make_peft_adapter(base, tmp_path / "r32", r=32, seed=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        llm.generate(one, SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("big", 9, str(big)), use_tqdm=False)
    every = make_peft_adapter(base, tmp_path / "all", r=4, seed=5, target_modules="all-linear")
    with pytest.raises(ValueError, match="AltUp linears is not supported"):
        llm.generate(one, SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("every", 10, str(every)), use_tqdm=False)
    added = make_added_tokens_adapter(base, tmp_path / "added")
    with pytest.raises(ValueError, match="lora_extra_vocab_size=0"):
        llm.generate(one, SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("added", 11, str(added)), use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate([{"prompt_token_ids": prompts[0],
                       "multi_modal_data": {"image": torch.zeros(3, 8, 8)}}],
                     SamplingParams(max_tokens=2), use_tqdm=False)
    out = llm.generate(one, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_prompt_embeds_refused(gemma3n, prompts):
    """prompt_embeds have no token ids for the per-layer embeddings: refused alone."""
    llm = make_llm(gemma3n["base"], enable_prompt_embeds=True, max_model_len=64)
    with pytest.raises(ValueError, match="per-layer embeddings"):
        llm.generate([{"prompt_embeds": torch.zeros(3, 64)}], SamplingParams(max_tokens=2),
                     use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.fixture(scope="module")
def server(gemma3n):
    """The same weights saved as Gemma3nForConditionalGeneration, served on text, with
    the rank-8 adapter under the whole model's names."""
    root = gemma3n["root"]
    mm = as_conditional_generation(gemma3n["base"], root / "conditional")
    adapter = as_conditional_adapter(gemma3n["adapters"]["r8_all"], root / "conditional_r8")
    args = ["--max-model-len", "256", "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", "8", "--lora-modules", f"r8={adapter}"]
    env = {"LORAPLEX_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    with RemoteServer(mm, args, env=env) as s:
        yield s, str(mm)


def test_server_conditional_generation_on_text(server, gemma3n, prompts, tmp_path):
    """Completions on the base and the adapter (HF + PEFT's tokens on the text
    checkpoint, the same weights); an image and an audio clip in a chat message, and an
    adapter of a rank above --max-lora-rank, are 400s alone, the server carrying on."""
    server, base = server
    client = server.get_client()
    for model, adapter in ((base, None), ("r8", gemma3n["adapters"]["r8_all"])):
        r = client.completions.create(model=model, prompt=prompts[0], max_tokens=6,
                                      temperature=0, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True})
        assert token_ids_of(r.choices[0].logprobs) == hf_greedy(gemma3n["base"], adapter,
                                                                prompts[0], 6), model
    check_media_refused(client, base)
    big = make_peft_adapter(gemma3n["base"], tmp_path / "r32", r=32, seed=4)
    r = server.post("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(big)})
    assert r.status_code == 400 and "max_lora_rank" in r.json()["error"]["message"], r.text
    r = client.completions.create(model="r8", prompt=prompts[1], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_kv_sharing_greedy_on_any_transformers(gemma3n, prompts):
    """KV sharing against HF's cached generation, which shares K/V on every transformers
    (on 4.56 the checkpoint saves the reusing layers' own k/v_proj and norms, and PEFT
    puts a LoRA on those k/v_proj: both left out, as HF's cached path leaves them):
    greedy tokens of the base and a q/k/v adapter, a prompt past the window."""
    base = make_gemma3n(gemma3n["root"] / "shared", seed=7, num_kv_shared_layers=2,
                        vocab_size_per_layer_input=len(load_tokenizer()))
    adapter = make_peft_adapter(base, gemma3n["root"] / "shared_qkv", r=4, seed=8,
                                target_modules=("q_proj", "k_proj", "v_proj"))
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=16)
    attns = [layer.self_attn.attn for layer in llm.llm_engine.model.model.layers]
    assert [a.reads_kv_of for a in attns] == [None, None, None, attns[1], attns[2]]
    req = lora_requests({"qkv": adapter})["qkv"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompts[-1]}] * 2, params,
                        lora_request=[None, req], use_tqdm=False)
    for out, lora in zip(outs, (None, adapter), strict=True):
        assert list(out.outputs[0].token_ids) == hf_greedy(base, lora, prompts[-1], 12)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids

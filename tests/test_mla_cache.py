"""MLA's latent KV cache (layers/mla.py, layers/mla_lora.py): the paged cache holds [c, kr]
per token and layer, one tensor that is both K and V; decode rows (and the Triton path)
attend absorbed, the torch path's prefill rows decompressed (which runs where: a forward
hook on kv_b_proj's base linear, which only the decompressed form calls).

Against HF transformers + PEFT (fp32, tiny DeepSeek-V3 / V2 from tests/test_deepseek.py):
adapters of different ranks on kv_b_proj (plain, DoRA, lora_bias, and one also on the
query) in one batch with the base over several slots; prefix caching with chunked
prefill (later chunks and cache hits attend over cached latents); preemption by
recompute; the Triton kernels (interpreter) with all of it; an FP8 latent cache against
HF whose cached latents are rounded as the cache holds them, whole prompts and chunks.
The cache's size: bytes per token and layer = (kv_lora_rank + qk_rope_head_dim) x the
dtype's size, in the tensors allocated, the memory plan and the blocks a budget buys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex import SamplingParams
from loraplex.layers.attention import quantize_kv
from tests.engine_utils import (
    check_against_hf,
    check_mixed_batch,
    lora_requests,
    make_llm,
    run_staggered,
)
from tests.fixtures import make_peft_adapter
from tests.test_attention import check_decode, interpreted
from tests.test_deepseek import ATTENTION, make_deepseek

LATENT = 24 + 8  # kv_lora_rank + qk_rope_head_dim of test_deepseek's configs
LAYERS = 3
FP8 = torch.float8_e4m3fn


def _specs(version: str) -> dict[str, dict]:
    query = ATTENTION[version][0] if version == "v2" else "q_b_proj"
    return {"r2_kvb": dict(r=2, lora_alpha=4, target_modules=["kv_b_proj"]),
            "r8_kvb_q": dict(r=8, lora_alpha=16, target_modules=["kv_b_proj", query]),
            "dora_kvb": dict(r=4, lora_alpha=8, target_modules=["kv_b_proj"], use_dora=True),
            "bias_kvb": dict(r=4, lora_alpha=8, target_modules=["kv_b_proj"], lora_bias=True)}


@pytest.fixture(scope="module")
def mla(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """version -> (base, {adapter name -> dir}), built on first use."""
    class Lazy(dict):
        def __missing__(self, version: str) -> tuple[Path, dict[str, Path]]:
            root = tiny_root / "mla_cache"
            seed = 60 if version == "v3" else 65
            base = make_deepseek(root / version, version, seed)
            self[version] = (base, {name: make_peft_adapter(
                base, root / f"{version}_{name}", seed=seed + i, **spec)
                for i, (name, spec) in enumerate(_specs(version).items())})
            return self[version]
    return Lazy()


def _elem(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


@pytest.mark.parametrize("cache_dtype", ["auto", "fp8"])
def test_cache_holds_the_latent(cache_dtype, mla):
    """Each layer's cache is one [blocks, block, 1, kv_lora_rank + rope] tensor (v_cache is
    k_cache), the memory plan counts that many bytes a block, and a budget of 10 blocks
    buys 10 (the decompressed K/V, 2 x 4 heads x 24 a token, would not fit one)."""
    base, _ = mla["v3"]
    block = 16
    dtype = FP8 if cache_dtype == "fp8" else torch.float32
    block_bytes = LAYERS * block * LATENT * _elem(dtype)
    llm = make_llm(base, block_size=block, max_model_len=64, kv_cache_dtype=cache_dtype,
                   kv_cache_memory_bytes=10 * block_bytes + block_bytes // 2)
    engine = llm.llm_engine
    runner = engine.model_runner
    assert runner.num_blocks == 10 and engine.memory.kv_block_bytes == block_bytes
    assert len(runner.attention_layers) == LAYERS
    tensors = {}
    for layer in runner.attention_layers:
        assert layer.v_cache is layer.k_cache
        assert layer.k_cache.shape == (10, block, 1, LATENT) and layer.k_cache.dtype == dtype
        tensors[layer.k_cache.data_ptr()] = layer.k_cache.nbytes
    assert sum(tensors.values()) == 10 * block_bytes == engine.memory.kv_bytes
    out = llm.generate([{"prompt_token_ids": [1, 5, 9, 14]}],
                       SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_kv_b_adapters_of_different_ranks_in_one_batch(version, mla, prompts):
    """The base and four adapters on kv_b_proj (ranks 2, 8 with the query too, DoRA,
    lora_bias) over four slots, in one generate call: each output HF + PEFT's."""
    base, adapters = mla[version]
    llm = make_llm(base, enable_lora=True, max_loras=4, max_lora_rank=8)
    check_mixed_batch(llm, base, adapters, prompts, extra=3)


def test_prefix_caching_with_chunked_prefill(mla, prompts):
    """A long shared prefix (block size 4) computed by the first requests, then requests
    on the base and kv_b_proj adapters that find it cached, prompts cut into chunks of 5:
    every later chunk attends over latents read from the cache; outputs as HF + PEFT."""
    base, adapters = mla["v3"]
    reqs = lora_requests(adapters)
    system = prompts[-1]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4,
                   enable_chunked_prefill=True, max_num_batched_tokens=5,
                   enable_prefix_caching=True)
    first = system + prompts[0][1:]
    names = [None, "r2_kvb", "r8_kvb_q", "r2_kvb"]
    jobs = [(0, first, None), (0, first, reqs["r2_kvb"])]
    jobs += [(12 + 2 * i, system + prompts[1 + i % 3][1:], reqs[n] if n else None)
             for i, n in enumerate(names)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    outs, _ = run_staggered(llm.llm_engine, jobs, params)
    cached = [o.num_cached_tokens for o in outs]
    assert cached[:2] == [0, 0] and cached[4] == 0, cached  # r8_kvb_q: nothing of its own
    assert all(c >= len(system) // 4 * 4 for c in cached[2:4] + cached[5:]), cached
    check_against_hf(outs, base, [adapters[r.lora_name] if r else None for _, _, r in jobs],
                     [p for _, p, _ in jobs], atol=2e-4)


def test_prefill_decompressed_decode_absorbed(mla, prompts):
    """The torch path's two forms, seen through kv_b_proj's base linear (a forward hook):
    the decompressed prefill calls it once a layer and step on each prefilling sequence's
    latents, its cached context's and its chunk's ([B, width] rows), never on a decode
    row's (absorbed: kv_b_proj's weight taken into the query and output, the module not
    called); a decode-only step never calls it. Chunks of 5 over a cached prefix (block
    size 4) under kv_b_proj adapters (plain, DoRA, lora_bias) beside the base, with
    decode rows in the same steps: every output HF + PEFT's."""
    from loraplex.worker.context import get_context

    base, adapters = mla["v3"]
    reqs = lora_requests(adapters)
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=8, block_size=4,
                   enable_chunked_prefill=True, max_num_batched_tokens=5,
                   enable_prefix_caching=True)
    model = llm.llm_engine.model
    # is_prefill, mixed, cached context, an adapter on a prefill row
    steps: list[tuple[bool, bool, bool, bool]] = []
    kv_b_rows: list[tuple[int, int]] = []  # (rows kv_b_proj took, the prefill's B x width)

    def on_attention(module, args) -> None:
        ctx = get_context()
        meta, rows = ctx.lora_meta, args[1].shape[0]  # meta None: only the base
        if ctx.decode is not None:
            rows -= ctx.decode.slot_mapping.shape[0]
        adapter = meta is not None and bool((meta.token_lora_indices[:rows] >= 0).any())
        steps.append((ctx.is_prefill, ctx.decode is not None, ctx.context_lens is not None,
                      adapter))

    def on_kv_b(module, args, out) -> None:
        ctx = get_context()
        b, length = ctx.padded_index.shape
        width = length if ctx.context_lens is None else ctx.block_tables.shape[1] * 4
        kv_b_rows.append((args[0].shape[0], b * width))

    first = model.model.layers[0].self_attn
    hooks = [first.register_forward_pre_hook(on_attention)]
    hooks += [layer.self_attn.kv_b_proj.base_layer.register_forward_hook(on_kv_b)
              for layer in model.model.layers]
    system = prompts[-1]
    names = ["r2_kvb", "dora_kvb", None, "bias_kvb", "r2_kvb"]
    jobs = [(3 * i, system + prompts[i][1:], reqs[n] if n else None)
            for i, n in enumerate(names)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    try:
        outs, _ = run_staggered(llm.llm_engine, jobs, params)
    finally:
        for hook in hooks:
            hook.remove()
    prefill_steps = sum(step[0] for step in steps)
    assert len(kv_b_rows) == LAYERS * prefill_steps > 0
    assert all(rows == want for rows, want in kv_b_rows), kv_b_rows
    assert any(not step[0] for step in steps)  # decode-only steps: kv_b_proj not called
    assert any(all(step) for step in steps), steps  # mixed, cached context, an adapter
    assert any(o.num_cached_tokens for o in outs)
    check_against_hf(outs, base, [adapters[n] if n else None for n in names],
                     [p for _, p, _ in jobs], atol=2e-4)


def test_preemption_recomputes_latents(mla, prompts):
    """A KV cache of 12 blocks of 8 for six requests of up to 64 tokens forces preemption;
    recomputed latents give HF + PEFT's outputs."""
    base, adapters = mla["v3"]
    reqs = lora_requests(adapters)
    names = [None, "r2_kvb", "dora_kvb", None, "bias_kvb", "r8_kvb_q"]
    llm = make_llm(base, enable_lora=True, max_loras=3, max_lora_rank=8, max_model_len=64,
                   num_gpu_blocks_override=12, block_size=8)
    batch = [prompts[i % len(prompts)] for i in range(len(names))]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    check_against_hf(outs, base, [adapters[n] if n else None for n in names], batch)


@pytest.mark.parametrize("budget", [None, 5])
def test_triton_kernels_over_the_latent(monkeypatch, budget, mla, prompts):
    """The Triton kernels forced (under the interpreter on the CPU): the latent as one KV
    head of width 32 for 4 query heads, prefill, chunks over the cache, decode, with
    kv_b_proj adapters of two ranks over two slots beside the base."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = mla["v3"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8, block_size=8,
                   max_num_batched_tokens=budget)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    pick = {n: adapters[n] for n in ("r2_kvb", "r8_kvb_q")}
    check_mixed_batch(llm, base, pick, prompts, extra=1)


def hf_latent_fp8_logprobs(base: Path, adapter: Path | None, prompt: list[int],
                           tokens: list[int], chunk: int = 0) -> torch.Tensor:
    """HF + PEFT's log-probs after the prompt and each of tokens[:-1] as the engine computes
    them over an FP8 latent cache: the prompt in one forward with its latents as computed
    (`chunk`: in forwards of that many tokens, each over the earlier chunks' latents
    rounded and its own as computed, as the decompressed prefill takes them), then one
    token a forward over every latent (c and the rotated kr) rounded through FP8 (scale 1),
    as a read of the cache returns it."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

    if not hasattr(hf_v3.DeepseekV3Attention, "expand_kv"):
        pytest.skip("the reference rounds the cached latents in HF's expand_kv, which "
                    "transformers 4.x's DeepseekV3Attention does not have")
    exact: list[int] = [0]  # the forward's last positions whose latents are as computed
    expand = hf_v3.DeepseekV3Attention.expand_kv

    def rounded(self, kv_nope, k_rot):
        cut = kv_nope.shape[2] - exact[0]
        kv_nope, k_rot = (torch.cat([quantize_kv(x[:, :, :cut], FP8, 1.0).to(x.dtype),
                                     x[:, :, cut:]], dim=2) for x in (kv_nope, k_rot))
        return expand(self, kv_nope, k_rot)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    size = chunk or len(prompt)
    pieces = [prompt[i:i + size] for i in range(0, len(prompt), size)]
    rows, past = [], None
    hf_v3.DeepseekV3Attention.expand_kv = rounded
    try:
        with torch.no_grad():
            for i, piece in enumerate([*pieces, *([t] for t in tokens[:-1])]):
                exact[0] = len(piece) if i < len(pieces) else 0
                res = model(input_ids=torch.tensor([piece]), past_key_values=past,
                            use_cache=True)
                past = res.past_key_values
                if i >= len(pieces) - 1:
                    rows.append(res.logits[0, -1])
    finally:
        hf_v3.DeepseekV3Attention.expand_kv = expand
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def test_fp8_latent_cache_against_hf(mla, prompts):
    """kv_cache_dtype fp8: the base and two kv_b_proj adapters, each output against HF +
    PEFT whose cached latents are rounded through FP8 (so only fp32 noise is left:
    logprobs within 1e-4, greedy picks the reference's)."""
    base, adapters = mla["v3"]
    reqs = lora_requests(adapters)
    names = [None, "r2_kvb", "dora_kvb"]
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in range(3)], params,
                        lora_request=[reqs[n] if n else None for n in names], use_tqdm=False)
    for out, name, prompt in zip(outs, names, prompts, strict=False):
        got = out.outputs[0].token_ids
        ref = hf_latent_fp8_logprobs(base, adapters[name] if name else None, prompt, got)
        for step, (tok, lp) in enumerate(zip(got, out.outputs[0].logprobs, strict=True)):
            assert ref[step].max() - ref[step, tok] < 1e-3, (name, step)
            for t, logprob in lp.items():
                assert abs(logprob.logprob - ref[step, t].item()) < 1e-4, (name, step, t)


def test_fp8_latent_cache_chunked_prefill_against_hf(mla, prompts):
    """kv_cache_dtype fp8 with prompts in chunks of 5: each later chunk's decompressed
    prefill reads the earlier chunks' latents back through FP8 and takes its own as
    computed (vLLM's). The base and kv_b_proj adapters (plain, lora_bias), each request
    alone, against HF + PEFT over the same chunks with the same latents rounded."""
    base, adapters = mla["v3"]
    reqs = lora_requests(adapters)
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=8,
                   kv_cache_dtype="fp8", enable_chunked_prefill=True,
                   max_num_batched_tokens=5, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    for name, prompt in ((None, prompts[-1]), ("r2_kvb", prompts[-2]),
                         ("bias_kvb", prompts[-1])):
        assert len(prompt) > 10
        out = llm.generate([{"prompt_token_ids": prompt}], params,
                           lora_request=reqs[name] if name else None, use_tqdm=False)[0]
        got = out.outputs[0].token_ids
        ref = hf_latent_fp8_logprobs(base, adapters[name] if name else None, prompt, got,
                                     chunk=5)
        for step, (tok, lp) in enumerate(zip(got, out.outputs[0].logprobs, strict=True)):
            assert ref[step].max() - ref[step, tok] < 1e-3, (name, step)
            for t, logprob in lp.items():
                assert abs(logprob.logprob - ref[step, t].item()) < 1e-4, (name, step, t)


@pytest.mark.parametrize("graph", [False, True])
def test_absorbed_kv_b_lora_equals_the_decompressed(graph):
    """KvBLoRA against PEFT's one line on the decompressed form: per token i of slot s,
    k = (W + B_s A_s) c (K rows) scores q . k, v = (W + B_s A_s) o (V rows), slot -1 the
    base. Slots of ranks 3 and 5 (max 6) and the base in one batch; `graph`: the CUDA
    graph's branch (every slot over every row, masked; skip_unused_layers False)."""
    from loraplex.layers.linear import Linear
    from loraplex.layers.mla_lora import kv_b_lora
    from loraplex.lora.layers import LinearWithLoRA
    from loraplex.lora.meta import LoRABatchMeta
    from loraplex.worker.context import StepContext, step_context

    heads, nope, v_dim, c_dim = 3, 4, 5, 7
    gen = torch.Generator().manual_seed(0)
    base = Linear(c_dim, [heads * (nope + v_dim)])
    base.weight.data = torch.randn(base.weight.shape, generator=gen)
    layer = LinearWithLoRA(base, max_loras=3, max_rank=6, dtype=torch.float32)
    ab = {s: (torch.randn(r, c_dim, generator=gen), torch.randn(heads * (nope + v_dim), r,
                                                              generator=gen))
          for s, r in ((0, 3), (2, 5))}
    for s, (a, b) in ab.items():
        layer.set_lora(s, [a], [b])
    slots = [2, -1, 0, 2, -1, 0]
    t = len(slots)
    q = torch.randn(t, heads, nope, generator=gen)
    o = torch.randn(t, heads, c_dim, generator=gen)
    meta = LoRABatchMeta.make(slots, torch.device("cpu"))
    meta.skip_unused_layers = not graph
    ctx = StepContext(is_prefill=True, slot_mapping=torch.zeros(t, dtype=torch.long),
                      attn_backend="torch", lora_meta=meta)
    with step_context(ctx):
        lora = kv_b_lora(layer, heads, nope, slice(0, t))
        w = base.weight.view(heads, nope + v_dim, c_dim)
        q_latent = torch.einsum("thn,hnc->thc", q, w[:, :nope])
        lora.add_query(q_latent, q)
        v = lora.add_value(torch.einsum("thc,hvc->thv", o, w[:, nope:]), o)
    for i, s in enumerate(slots):
        full = base.weight + (ab[s][1] @ ab[s][0] if s >= 0 else 0)  # [H (nope + v), C]
        full = full.view(heads, nope + v_dim, c_dim)
        c = torch.randn(c_dim, generator=gen)  # any latent: the scores agree
        torch.testing.assert_close(torch.einsum("hc,c->h", q_latent[i], c),
                                   torch.einsum("hn,hnc,c->h", q[i], full[:, :nope], c))
        torch.testing.assert_close(v[i], torch.einsum("hvc,hc->hv", full[:, nope:], o[i]))


def test_latent_fp8_scale_is_keys():
    """The latent is one tensor, so one scale: a checkpoint's k_scale (or kv_scale) is
    used for both reads, a v_scale is ignored (vLLM's MLA reads k_scale alone)."""
    from loraplex.layers.attention import Attention

    attn = Attention(4, 1, LATENT, 0.1, values_are_keys=True)
    attn.load_kv_scale("model.layers.0.self_attn.k_scale", torch.tensor(0.5))
    attn.load_kv_scale("model.layers.0.self_attn.v_scale", torch.tensor(2.0))
    assert (attn.k_scale, attn.v_scale) == (0.5, 0.5)


@interpreted
def test_decode_kernel_tiles_a_wide_group():
    """The decode kernel over MLA's shape: 40 query heads on one KV head wider than 256
    (here 272, padded to 512), so a program takes 16 heads and the group spans three
    programs (the last one part empty); splits merged. Against the float64 reference."""
    check_decode([1, 37, 16, 100], h=40, kvh=1, d=272, block_size=16,
                 dtype=torch.float32, splits=3, seed=5)


_MLA_LAUNCHES = """
from loraplex.layers import triton_attention as A
for name in ("_store_kvcache_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel"):
    setattr(A, name, Capture(getattr(A, name)))
for h in (16, 128):  # DeepSeek-V2-Lite / Moonlight, DeepSeek-V3: the latent 512 + 64
    kc = torch.zeros(8, 16, 1, 576, dtype=torch.bfloat16)
    table, lens = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    q = torch.zeros(2, h, 576, dtype=torch.bfloat16)
    A.paged_decode_attention(q, kc, kc, table, lens, 0.1, num_splits=4)
    qt = torch.zeros(24, h, 576, dtype=torch.bfloat16)
    k = torch.zeros(24, 1, 576, dtype=torch.bfloat16)
    A.prefill_attention(qt, k, k, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1,
                        kc, kc, table, lens)
    A.store_kvcache(k, k, kc, kc, torch.zeros(24, dtype=torch.int32))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernels run for real")
def test_kernels_compile_for_h100_at_deepseek_shapes():
    """Compiled for sm_90 (no GPU needed) at DeepSeek's latent shape, each launch within an
    H100's shared memory (a whole 128-head group's decode tile took 384 KiB)."""
    from tests.triton_compile import compile_for_h100

    assert compile_for_h100(_MLA_LAUNCHES) == 8


def test_fp8_weights_absorbed(mla, prompts, tiny_root):
    """An FP8 checkpoint (a scale per row on every projection, kv_b_proj's included):
    kv_b_proj's weight is dequantized for the absorption. Against HF + PEFT on the same
    weights rounded through FP8 and back (fp32), with a kv_b_proj adapter beside the base."""
    import json
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.quantized_fixtures import quantize_fp8

    base, adapters = mla["v3"]
    quant, ref = tiny_root / "mla_cache" / "v3_fp8", tiny_root / "mla_cache" / "v3_fp8_ref"
    if not quant.exists():
        state = load_file(str(base / "model.safetensors"))
        q_state, ref_state = {}, {}
        for key, w in state.items():
            if re.search(r"_proj(_with_mqa)?\.weight$", key) and w.dim() == 2:
                q, scale, deq = quantize_fp8(w, "channel")
                q_state.update({key: q, key.replace(".weight", ".weight_scale"): scale})
                ref_state[key] = deq.to(w.dtype)
            else:
                q_state[key] = ref_state[key] = w
        for d, s in ((quant, q_state), (ref, ref_state)):
            shutil.copytree(base, d)
            save_file(s, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((quant / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                      "activation_scheme": "dynamic"}
        (quant / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(quant, enable_lora=True, max_loras=1, max_lora_rank=8)
    kv_b = llm.llm_engine.model.model.layers[0].self_attn.kv_b_proj
    assert kv_b.base_layer.weight.dtype == FP8
    check_mixed_batch(llm, ref, {"r2_kvb": adapters["r2_kvb"]}, prompts, extra=1)

"""kv_cache_dtype fp8 (vLLM's --kv-cache-dtype): the paged cache holds K / k_scale and
V / v_scale saturated to the FP8 range, reads multiply back.

Op level: attention over an FP8 cache equals the float64 reference over the cached K/V
rounded to FP8 and back (so only fp32 rounding is left: 1e-5), on the torch path and the
Triton kernels (interpreter; compiled for sm_90 too). Engine level: the cache's dtype and
size for a budget, outputs against HF + PEFT within what FP8 rounding costs, prefix
caching, the checkpoint's scales.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.layers.attention import Attention, quantize_kv, torch_prefill_layout
from loraplex.worker.context import DecodeBuffers, StepContext, step_context
from tests.engine_utils import GREEDY, lora_requests, make_llm
from tests.fixtures import edited_copy
from tests.test_attention import (
    CUDA,
    DEV,
    cached_kv,
    interpreted,
    paged_cache,
    reference,
    rel_err,
    ta,
)
from tests.triton_compile import compile_for_h100

FP8 = torch.float8_e4m3fn
# scales: vLLM's default 1.0, and a calibrated-looking pair (K and V differ)
SCALES = [(1.0, 1.0), (0.37, 2.5)]
# Engine outputs against HF + PEFT whose attention reads K/V rounded through FP8 as the
# cache holds them (hf_fp8_logprobs): only fp32 noise is left, and the odd value on the
# other side of an FP8 rounding boundary (measured: max 2.2e-5 over these tests).
# Against plain fp32 HF the tiny models' logprobs move by a median 0.06, up to 0.8 (e4m3;
# e5m2, one mantissa bit less: median 0.14, up to 5): head_dim 16 and random weights make
# the scores sharp, so a ~3% rounding of each K/V value shows.
FP8_ATOL = 1e-4


def fp8_cache(lens, kvh, d, block_size, gen, scales=(1.0, 1.0), dtype=FP8, spread=3.0):
    """paged_cache's random caches quantized (some values past the FP8 range: saturated),
    and their dequantized fp32 copies: what a correct read returns."""
    k, v, table = paged_cache(lens, kvh, d, block_size, torch.float32, DEV, gen)
    k, v = k * spread, v * spread * 100  # V beyond 448 x scale: saturates
    caches = [quantize_kv(x, dtype, s) for x, s in zip((k, v), scales)]
    return caches, [c.float() * s for c, s in zip(caches, scales)], table


def test_quantize_saturates_and_rounds():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0, 0.3, -17.0, 1e-9])
    for dtype in (FP8, torch.float8_e5m2):
        for scale in (1.0, 0.25):
            q = quantize_kv(x, dtype, scale)
            fmax = torch.finfo(dtype).max
            assert q.dtype == dtype and q.float().isfinite().all()
            assert q.float()[0] == fmax and q.float()[1] == -fmax  # saturated, not NaN
            want = (x / scale).clamp(-fmax, fmax).to(dtype)
            assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


@interpreted
@pytest.mark.parametrize("dtype", [FP8, torch.float8_e5m2])
@pytest.mark.parametrize("scales", SCALES)
def test_store_kernel_quantizes_as_torch(dtype, scales):
    """Exactly the values quantize_kv writes (across the whole range, saturating ones,
    those that round up into the next binade); slot -1 skipped. Compared as values, so
    -0 equals +0: Triton 3.2's interpreter (the floors job) casts -0.0 to +0."""
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(40, 2, 2, 16, generator=gen) * torch.logspace(-4, 3.5, 40)[:, None, None,
                                                                                  None]
    kv[0, :, 0, :3] = torch.tensor([1e6, -31.76, 7.77])
    slots = torch.randperm(48, generator=gen)[:40]
    slots[5] = -1
    k_cache, v_cache = (torch.zeros(6, 8, 2, 16, dtype=dtype) for _ in range(2))
    ta.store_kvcache(kv[:, 0], kv[:, 1], k_cache, v_cache, slots, *scales)
    for i, cache in enumerate((k_cache, v_cache)):
        want = torch.zeros(cache.shape)
        keep = slots >= 0
        want.view(-1, 2, 16)[slots[keep]] = quantize_kv(kv[keep, i], dtype, scales[i]).float()
        assert torch.equal(cache.float(), want)  # an FP8 value is exact in fp32


@interpreted
@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("splits,window", [(1, 0), (3, 0), (3, 7)])
def test_triton_decode_over_fp8(scales, splits, window):
    gen = torch.Generator().manual_seed(splits + window)
    lens, h, kvh, d = [1, 37, 100, 0], 4, 2, 32
    (k_cache, v_cache), (k_ref, v_ref), table = fp8_cache(lens, kvh, d, 8, gen, scales)
    q = torch.randn(len(lens), h, d, generator=gen)
    out = ta.paged_decode_attention(q, k_cache, v_cache, table,
                                    torch.tensor(lens, dtype=torch.int32), d ** -0.5, splits,
                                    window=window, k_scale=scales[0], v_scale=scales[1])
    for b, n in enumerate(lens[:-1]):
        k, v = cached_kv(k_ref, v_ref, table[b], n)
        ref = reference(q[b:b + 1], k, v, d ** -0.5, n - 1, window=window)
        assert rel_err(out[b:b + 1], ref) < 1e-5, (b, n)
    assert out[-1].eq(0).all()


@interpreted
@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("window", [0, 7])
def test_triton_prefill_over_fp8_context(scales, window):
    """The cached context is read through FP8; the chunk's own K/V are used as computed."""
    gen = torch.Generator().manual_seed(window)
    q_lens, ctx_lens, h, kvh, d = [4, 33, 9], [21, 0, 40], 4, 2, 32
    (k_cache, v_cache), (k_ref, v_ref), table = fp8_cache(ctx_lens, kvh, d, 8, gen, scales)
    t = sum(q_lens)
    q, k, v = (torch.randn(t, n, d, generator=gen) for n in (h, kvh, kvh))
    cu = torch.tensor([0, 4, 37, 46], dtype=torch.int32)
    out = ta.prefill_attention(q, k, v, cu, max(q_lens), d ** -0.5, k_cache, v_cache, table,
                               torch.tensor(ctx_lens, dtype=torch.int32), window=window,
                               k_scale=scales[0], v_scale=scales[1])
    for b, (n, c) in enumerate(zip(q_lens, ctx_lens)):
        s = int(cu[b])
        kc, vc = cached_kv(k_ref, v_ref, table[b], c)
        ref = reference(q[s:s + n], torch.cat([kc, k[s:s + n]]), torch.cat([vc, v[s:s + n]]),
                        d ** -0.5, c, window=window)
        assert rel_err(out[s:s + n], ref) < 1e-5, b


def _fp8_layer(h, kvh, d, caches, scales, window=0) -> Attention:
    layer = Attention(h, kvh, d, d ** -0.5, window=window)
    layer.k_cache, layer.v_cache = caches
    layer.k_scale, layer.v_scale = scales
    return layer


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("backend,window", [
    ("torch", 0), ("torch", 5), pytest.param("triton", 5, marks=interpreted)])
def test_layer_decode_writes_and_reads_fp8(scales, backend, window):
    """One decode step through the layer: the new token is written quantized, and the
    attention (the torch path: gathered, then over its mirror on the next step) equals
    the reference over the dequantized cache."""
    h, kvh, d, bs = 4, 2, 32, 8
    lens = [30, 13, 8, 1]
    gen = torch.Generator().manual_seed(1)
    caches, _, table = fp8_cache([n + 1 for n in lens], kvh, d, bs, gen, scales)
    layer = _fp8_layer(h, kvh, d, caches, scales, window)
    tables = [row.tolist()[:-(-(n + 1) // bs)] for row, n in zip(table, lens)]
    buffers = DecodeBuffers(8, 6, DEV)
    for step in range(2):  # torch: the second step appends to the mirror the first built
        now = [n + step for n in lens]
        slots = [t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, now)]
        q, k, v = (torch.randn(len(now), n, d, generator=gen) * 3 for n in (h, kvh, kvh))
        slot_mapping, context_lens, block_tables = buffers.fill(slots, now, tables)
        ctx = StepContext(is_prefill=False, slot_mapping=slot_mapping, attn_backend=backend,
                          block_tables=block_tables, context_lens=context_lens,
                          max_context_len=max(now), decode_splits=2)
        if backend == "torch":
            ctx.mirror_groups, ctx.mirror_rebuild = [(0, 4, 32)], step == 0
            ctx.decode_groups = [(0, 4, max(now))]
        with step_context(ctx):
            out = layer(q, k, v).view(len(now), h, d)
        k_ref, v_ref = (c.float() * s for c, s in zip((layer.k_cache, layer.v_cache), scales))
        for b, n in enumerate(now):
            kc, vc = cached_kv(k_ref, v_ref, block_tables[b], n)
            assert torch.equal(kc[-1], quantize_kv(k[b], FP8, scales[0]).float() * scales[0])
            assert torch.equal(vc[-1], quantize_kv(v[b], FP8, scales[1]).float() * scales[1])
            ref = reference(q[b:b + 1], kc, vc, d ** -0.5, n - 1, window=window)
            assert rel_err(out[b:b + 1], ref) < 1e-5, (step, b)


@pytest.mark.parametrize("scales", SCALES)
def test_torch_prefill_chunk_over_fp8_context(scales):
    """A later chunk of a prompt on the torch path: its own K/V are written first and the
    whole sequence read back from the cache, all of it through FP8."""
    h, kvh, d, bs = 4, 2, 32, 8
    gen = torch.Generator().manual_seed(2)
    starts, lens = [21, 9], [4, 12]
    caches, _, table = fp8_cache([s + n for s, n in zip(starts, lens)], kvh, d, bs, gen,
                                 scales)
    layer = _fp8_layer(h, kvh, d, caches, scales, window=6)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, generator=gen) for n in (h, kvh, kvh))
    slots = [int(table[b, p // bs]) * bs + p % bs
             for b, (s, n) in enumerate(zip(starts, lens)) for p in range(s, s + n)]
    width = -(-max(s + n for s, n in zip(starts, lens)) // bs)
    ctx = StepContext(is_prefill=True, slot_mapping=torch.tensor(slots), attn_backend="torch",
                      block_tables=table[:, :width].contiguous(),
                      context_lens=torch.tensor(starts, dtype=torch.int32),
                      max_context_len=max(starts), max_seqlen_q=max(lens))
    torch_prefill_layout(ctx, lens, DEV, starts, width * bs)
    with step_context(ctx):
        out = layer(q, k, v).view(t, h, d)
    k_ref, v_ref = (c.float() * s for c, s in zip((layer.k_cache, layer.v_cache), scales))
    row = 0
    for b, (s, n) in enumerate(zip(starts, lens)):
        kc, vc = cached_kv(k_ref, v_ref, table[b], s + n)
        ref = reference(q[row:row + n], kc, vc, d ** -0.5, s, window=6)
        assert rel_err(out[row:row + n], ref) < 1e-5, b
        row += n


_LAUNCHES = """
from loraplex.layers import triton_attention as A
for name in ("_store_kvcache_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel"):
    setattr(A, name, Capture(getattr(A, name)))
types.update({torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"})
for cache_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    for dtype, h, kvh, d in ((torch.bfloat16, 32, 8, 128), (torch.float32, 16, 2, 64)):
        kc, table = torch.zeros(8, 16, kvh, d, dtype=cache_dtype), torch.zeros(2, 4, dtype=torch.int32)
        lens, q = torch.zeros(2, dtype=torch.int32), torch.zeros(2, h, d, dtype=dtype)
        for splits in (1, 4):
            A.paged_decode_attention(q, kc, kc, table, lens, 0.1, num_splits=splits,
                                     window=64 * (splits - 1), k_scale=0.5, v_scale=2.0)
        qt, k = torch.zeros(24, h, d, dtype=dtype), torch.zeros(24, kvh, d, dtype=dtype)
        A.prefill_attention(qt, k, k, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1,
                            kc, kc, table, lens, k_scale=0.5, v_scale=2.0)
        A.store_kvcache(k, k, kc, kc, torch.zeros(24, dtype=torch.int32), 0.5, 2.0)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the kernels run compiled")
def test_fp8_kernels_compile_for_h100():
    """FP8 loads and the store's rounding compile for sm_90 (4 launches x 2 model dtypes
    x 2 FP8 types, the splits' merge included)."""
    assert compile_for_h100(_LAUNCHES) == 20


# ---- the engine on the tiny models ------------------------------------------------------

def hf_fp8_logprobs(base, adapter, prompt, tokens, exact=None, scales=(1.0, 1.0)
                    ) -> torch.Tensor:
    """HF + PEFT's log-probs of the next token after prompt and after each of tokens[:-1],
    as the engine computes them over an FP8 cache: its first `exact` prompt tokens (all by
    default: one prefill) attend over K/V as computed, every later forward over all K/V
    quantized as the cache stores them (quantize_kv, then x scale). HF's own KV cache
    keeps the exact values, so a read rounds them as the engine's store did."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rounding = []

    def fp8_sdpa(module, query, key, value, *args, **kw):
        if rounding:
            key, value = (quantize_kv(x, FP8, sc).to(x.dtype) * sc
                          for x, sc in zip((key, value), scales))
        return sdpa_attention_forward(module, query, key, value, *args, **kw)

    AttentionInterface.register("fp8_kv_test", fp8_sdpa)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation="fp8_kv_test")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    exact = len(prompt) if exact is None else exact
    # one token a forward after the exact ones (what it sees is the same as in one chunk
    # over a cache; HF's mask for a multi-token chunk after a cache is SDPA's, not ours)
    chunks = [prompt[:exact], *([t] for t in prompt[exact:] + tokens[:-1])]
    rows, past = [], None
    with torch.no_grad():
        for i, chunk in enumerate(c for c in chunks if c):
            rounding.append(i)  # (empty: the first forward runs exact)
            if i == 0:
                rounding.clear()
            res = model(input_ids=torch.tensor([chunk]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            rows.append(res.logits[0, -1])
    return torch.log_softmax(torch.stack(rows[-len(tokens):]).float(), dim=-1)


def check_against_fp8_hf(outputs, base, adapters, prompts, scales=(1.0, 1.0),
                         tie_tol=1e-3) -> None:
    """Each output against hf_fp8_logprobs, teacher-forced on the engine's tokens (its
    cached prompt tokens computed exact, as the request that cached them did): logprobs
    within FP8_ATOL, the greedy pick the reference's but at a near-tie (top two within
    tie_tol)."""
    for out, adapter, prompt in zip(outputs, adapters, prompts, strict=True):
        got = out.outputs[0].token_ids
        ref = hf_fp8_logprobs(base, adapter, prompt, got, out.num_cached_tokens or None,
                              scales)
        for step, (tok, lp) in enumerate(zip(got, out.outputs[0].logprobs, strict=True)):
            assert ref[step].max() - ref[step, tok] < tie_tol, (adapter, prompt, step)
            for t, logprob in lp.items():
                diff = abs(logprob.logprob - ref[step, t].item())
                assert diff < FP8_ATOL, (adapter, prompt, step, t, diff)


def _engine(base, **kw):
    kw.setdefault("max_num_seqs", 4096)  # so the budget, not the cap, sizes the cache
    return make_llm(base, **kw).llm_engine


def test_fp8_cache_dtype_and_blocks(tiny_models):
    """Per budget (cpu_kv_cache_gib, with adapter slots taken out of it, or an explicit
    kv_cache_memory_bytes) and model dtype: FP8 holds 4x the blocks of an fp32 cache and
    2x those of a bf16 one, and the memory plan (the start-up line) counts FP8 bytes."""
    base = tiny_models["llama"]
    for budget in (dict(cpu_kv_cache_gib=0.02, enable_lora=True, max_loras=2),
                   dict(kv_cache_memory_bytes=3 * 2**20)):
        for dtype, model_dtype, ratio in (("float32", torch.float32, 4),
                                          ("bfloat16", torch.bfloat16, 2)):
            blocks = {}
            for kv, cache_dtype in (("auto", model_dtype), ("fp8", FP8),
                                    ("fp8_e5m2", torch.float8_e5m2)):
                engine = _engine(base, dtype=dtype, kv_cache_dtype=kv, **budget)
                blocks[kv] = engine.model_runner.num_blocks
                layers = engine.model_runner.attention_layers
                assert {c.dtype for m in layers for c in (m.k_cache, m.v_cache)} == {
                    cache_dtype}
                assert engine.memory.kv_bytes == sum(
                    c.numel() * c.element_size() for m in layers for c in (m.k_cache, m.v_cache))
            assert blocks["fp8"] == blocks["fp8_e5m2"]
            assert 0 <= blocks["fp8"] - ratio * blocks["auto"] < ratio, (blocks, budget)
    assert "KV cache (float8_e5m2)" in engine.memory.describe(0)


def test_mixed_batch_close_to_hf(tiny_models, tiny_adapters, prompts):
    """Base and two adapters in one batch over an FP8 cache: greedy tokens HF + PEFT's
    (fp32, no cache) but where HF's top two are within FP8_TIE, logprobs within FP8_ATOL;
    steps cross blocks (block size 4) so decodes read earlier tokens through FP8."""
    base, adapters = tiny_models["llama"], tiny_adapters["llama"]
    reqs = lora_requests({n: adapters[n] for n in ("r8_all", "r4_qv")})
    llm = make_llm(base, enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4,
                   kv_cache_dtype="fp8")
    batch = [(p, n) for p in prompts[:3] for n in (None, "r8_all", "r4_qv")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], GREEDY,
                        lora_request=[reqs[n] if n else None for _, n in batch],
                        use_tqdm=False)
    check_against_fp8_hf(outs, base, [adapters[n] if n else None for _, n in batch],
                         [p for p, _ in batch])


def test_triton_engine_over_fp8(monkeypatch, tiny_models, tiny_adapters, prompts):
    """The Triton backend (interpreted) stores and reads the FP8 cache: its outputs are
    the torch path's (the same rounding; tokens equal, logprobs within 1e-4)."""
    if CUDA:
        pytest.skip("the interpreter runs only without CUDA")
    base, adapter = tiny_models["llama"], tiny_adapters["llama"]["r8_all"]
    lora = [None, lora_requests({"a": adapter})["a"]]
    jobs = [{"prompt_token_ids": p} for p in prompts[:2]]
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", backend)
        llm = make_llm(base, enable_lora=True, max_lora_rank=8, block_size=8,
                       kv_cache_dtype="fp8")
        assert llm.llm_engine.model_runner.attn_backend == backend
        outs[backend] = llm.generate(jobs, GREEDY, lora_request=lora, use_tqdm=False)
    for t, w in zip(outs["triton"], outs["torch"], strict=True):
        assert t.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(t.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[i].logprob - b[i].logprob) < 1e-4 for i in a)


def test_prefix_caching_hits_fp8_blocks(tiny_models, prompts):
    """A second request with the first's prompt reads its cached (FP8) blocks: hits, and
    the same output within FP8 rounding (the first used its own K/V as computed)."""
    base = tiny_models["llama"]
    llm = make_llm(base, block_size=4, kv_cache_dtype="fp8")
    prompt = prompts[-1]
    first, second = (llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]
                     for _ in range(2))
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= (len(prompt) - 1) // 4 * 4 > 0
    check_against_fp8_hf([first, second], base, [None, None], [prompt, prompt])


def _with_scales(base, dst, scales: dict[str, torch.Tensor]):
    """A copy of the tiny model with `scales` (name under self_attn -> tensor) added to
    every layer, as llm-compressor saves them."""
    def add(tensors):
        layers = {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}
        for i in layers:
            for leaf, t in scales.items():
                tensors[f"model.layers.{i}.self_attn.{leaf}"] = t.clone()
        return tensors
    return edited_copy(base, dst, tensors=add, config="config.json",
                       weights="model.safetensors")


def test_checkpoint_kv_scales(tiny_models, tmp_path, prompts):
    """k_scale / v_scale (and a lone kv_scale for both) load into every layer and the
    FP8 cache uses them (outputs still HF's within FP8 rounding; V over a scale of 0.02
    would saturate); a per-head scale or a non-positive one is refused."""
    base = tiny_models["llama"]
    path = _with_scales(base, tmp_path / "kv", {"k_scale": torch.tensor(0.05),
                                                "v_scale": torch.tensor([0.02])})
    llm = make_llm(path, block_size=4, kv_cache_dtype="fp8")
    layers = llm.llm_engine.model_runner.attention_layers
    assert [(m.k_scale, m.v_scale) for m in layers] == [(pytest.approx(0.05),
                                                         pytest.approx(0.02))] * 2
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], GREEDY, use_tqdm=False)
    check_against_fp8_hf(outs, path, [None, None], prompts[:2], scales=(0.05, 0.02))
    one = _with_scales(base, tmp_path / "one", {"kv_scale": torch.tensor(0.5)})
    layer = make_llm(one, kv_cache_dtype="fp8").llm_engine.model_runner.attention_layers[0]
    assert (layer.k_scale, layer.v_scale) == (0.5, 0.5)
    for name, bad, match in (("heads", torch.ones(2), "only a per-tensor KV cache scale"),
                             ("zero", torch.tensor(0.0), "must be positive")):
        path = _with_scales(base, tmp_path / name, {"k_scale": bad})
        with pytest.raises(ValueError, match=match):
            make_llm(path, kv_cache_dtype="fp8")


def test_unknown_kv_cache_dtype_is_refused(tiny_models):
    from loraplex.entrypoints.cli import main

    with pytest.raises(ValueError, match="kv_cache_dtype='int8' is not supported; use one "
                                         "of: auto, fp8, fp8_e4m3, fp8_e5m2"):
        make_llm(tiny_models["llama"], kv_cache_dtype="int8")
    with pytest.raises(SystemExit):  # argparse: invalid choice
        main(["serve", str(tiny_models["llama"]), "--kv-cache-dtype", "fp8_inc"])

"""ALiBi (BLOOM, MPT, Falcon-RW): each head's scores get slope x key position. The Triton
kernels (under the interpreter on the CPU) against a float64 reference, decode split or
not, prefill over cached context; and BLOOM and Falcon-RW (its slopes over sqrt(head_dim))
served by each attention backend against HF + PEFT, with chunked prefill and prefix
caching (its cached blocks' keys keep their positions).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraplex.layers.attention import Attention
from loraplex.models.classic import alibi_slopes, falcon_alibi_slopes, mpt_alibi_slopes
from tests.classic_fixtures import has_config, make_classic_model
from tests.engine_utils import check_mixed_batch, check_shared_prefixes, make_llm
from tests.fixtures import make_peft_adapter
from tests.test_attention import CUDA, DEV, cached_kv, interpreted, paged_cache, rel_err, ta
from tests.triton_compile import compile_for_h100

SLOPES = torch.tensor(alibi_slopes(6), dtype=torch.float32)  # 4 of one sequence, 2 of another


def alibi_reference(q, k, v, scale, slopes, q_offset=0, bias=None):
    """q [M, H, D] at positions q_offset.., k/v [N, KVH, D] at 0..N-1, causal, float64:
    softmax(scale q.k + slope_h j) v; `bias` [H, >= N]: softmax(scale q.k + bias_hj) v."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), k) * scale
    keys = torch.arange(k.shape[0], dtype=torch.float64)
    s = s + (slopes.double()[:, None, None] * keys if bias is None
             else bias.double()[:, None, :k.shape[0]])
    q_pos = q_offset + torch.arange(q.shape[0])
    s = s.masked_fill(keys[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


def test_slopes_are_blooms():
    """Powers of two: 2^(-8 i / n); past the largest power of two, every other slope of
    the sequence for twice as many heads (BLOOM's _get_alibi_slopes)."""
    assert alibi_slopes(4) == (2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8)
    assert alibi_slopes(6) == (2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3)


@pytest.mark.parametrize("heads", [6, 8])
def test_mpt_slopes_are_hfs(heads):
    """MPT's slopes: over the next power of two of heads, odd terms first (HF's
    build_mpt_alibi_tensor, at its alibi_bias_max of 8)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    hf = build_mpt_alibi_tensor(heads, 2)[:, 0, 0]  # key 0 of 2: -slope
    assert torch.tensor(mpt_alibi_slopes(heads, 8.0)) == pytest.approx(-hf, rel=1e-6)


def falcon_bias(heads: int, keys: int, head_dim: int) -> torch.Tensor:
    """HF's Falcon-RW bias [H, keys]: its build_alibi_tensor (slopes, positions and
    their products in bfloat16) over sqrt(head_dim), as FalconModel adds it to the scaled
    scores."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    mask = torch.ones(1, keys, dtype=torch.long)  # (as FalconModel builds it: long)
    return build_alibi_tensor(mask, heads, torch.float32)[:, 0, :] * head_dim ** -0.5


@pytest.mark.parametrize("heads", [4, 32])
def test_falcon_slopes_are_hfs(heads):
    """Falcon-RW's: BLOOM's slopes in bfloat16 (32 heads' are no powers of two)."""
    hf = falcon_bias(heads, 2, 1)[:, 1]  # key 1: the slope itself
    assert torch.tensor(falcon_alibi_slopes(heads)).tolist() == hf.tolist()


def test_torch_path_rounds_falcons_bias():
    """The torch path's Falcon-RW bias is HF's too: 300 tokens' causal attention (their
    keys past 256 at positions rounded to even) against the float64 reference."""
    gen = torch.Generator().manual_seed(12)
    heads, d, n = 16, 16, 300
    slopes = falcon_alibi_slopes(heads)
    attn = Attention(heads, 4, d, d ** -0.5, alibi_slopes=slopes, alibi_bf16_scale=d ** -0.5)
    q, k, v = (torch.randn(n, h, d, generator=gen) for h in (heads, 4, 4))
    out = attn._sdpa(*(t.transpose(0, 1)[None] for t in (q, k, v)), None)[0].transpose(0, 1)
    ref = alibi_reference(q, k, v, d ** -0.5, None, 0, falcon_bias(heads, n, d))
    assert rel_err(out, ref) < 1e-5


@interpreted
def test_kernels_round_falcons_bias():
    """Falcon-RW (alibi_bf16_scale): the position and slope x position in bfloat16,
    then over sqrt(head_dim), as HF's (fp32 slope x position is up to 0.3 off at position
    300; positions past 256 round to even): decode split over cached keys, prefill over
    cached context."""
    gen = torch.Generator().manual_seed(11)
    heads, d, scale = 16, 16, 16 ** -0.5
    slopes = torch.tensor(falcon_alibi_slopes(heads))
    bias = falcon_bias(heads, 310, d)
    lens = [300, 9]
    k_cache, v_cache, table = paged_cache(lens, 4, d, 16, torch.float32, DEV, gen)
    q = torch.randn(len(lens), heads, d, generator=gen)
    out = ta.paged_decode_attention(q, k_cache, v_cache, table,
                                    torch.tensor(lens, dtype=torch.int32), d ** -0.5,
                                    num_splits=2, alibi_slopes=slopes, alibi_bf16_scale=scale)
    for b, n in enumerate(lens):
        k, v = cached_kv(k_cache, v_cache, table[b], n)
        ref = alibi_reference(q[b:b + 1], k, v, scale, slopes, n - 1, bias)
        assert rel_err(out[b:b + 1], ref) < 1e-5, (b, n)
    new_k, new_v = (torch.randn(4, 4, d, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    q = torch.randn(4, heads, d, generator=gen)
    out = ta.prefill_attention(q, new_k, new_v, cu, 3, scale, k_cache, v_cache, table,
                               torch.tensor(lens, dtype=torch.int32), alibi_slopes=slopes,
                               alibi_bf16_scale=scale)
    for b, n in enumerate(lens):
        s, e = int(cu[b]), int(cu[b + 1])
        kc, vc = cached_kv(k_cache, v_cache, table[b], n)
        ref = alibi_reference(q[s:e], torch.cat([kc, new_k[s:e]]), torch.cat([vc, new_v[s:e]]),
                              scale, slopes, n, bias)
        assert rel_err(out[s:e], ref) < 1e-5, (b, n)


@interpreted
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel(splits):
    """Each sequence's new token over its cached keys, heads grouped on KV heads, the
    context split or not; length 0 gives zeros."""
    gen = torch.Generator().manual_seed(splits)
    lens, d = [1, 37, 0, 70], 32
    k_cache, v_cache, table = paged_cache(lens, 3, d, 16, torch.float32, DEV, gen)
    q = torch.randn(len(lens), 6, d, generator=gen)
    out = ta.paged_decode_attention(q, k_cache, v_cache, table,
                                    torch.tensor(lens, dtype=torch.int32), d ** -0.5,
                                    num_splits=splits, alibi_slopes=SLOPES)
    for b, n in enumerate(lens):
        if n == 0:
            assert out[b].eq(0).all()
            continue
        k, v = cached_kv(k_cache, v_cache, table[b], n)
        ref = alibi_reference(q[b:b + 1], k, v, d ** -0.5, SLOPES, q_offset=n - 1)
        assert rel_err(out[b:b + 1], ref) < 1e-5, (b, n)


@interpreted
def test_prefill_kernel_over_cached_context():
    """New tokens packed flat, each sequence after its cached context: the keys of both
    biased by their absolute positions."""
    gen = torch.Generator().manual_seed(7)
    q_lens, ctx_lens, d = [5, 20, 1], [0, 19, 40], 32
    t = sum(q_lens)
    q = torch.randn(t, 6, d, generator=gen)
    k, v = torch.randn(t, 6, d, generator=gen), torch.randn(t, 6, d, generator=gen)
    k_cache, v_cache, table = paged_cache(ctx_lens, 6, d, 16, torch.float32, DEV, gen)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ta.prefill_attention(q, k, v, cu, max(q_lens), d ** -0.5, k_cache, v_cache, table,
                               torch.tensor(ctx_lens, dtype=torch.int32),
                               alibi_slopes=SLOPES)
    for b, (n, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        s = int(cu[b])
        kc, vc = cached_kv(k_cache, v_cache, table[b], c)
        ref = alibi_reference(q[s:s + n], torch.cat([kc, k[s:s + n]]),
                              torch.cat([vc, v[s:s + n]]), d ** -0.5, SLOPES, q_offset=c)
        assert rel_err(out[s:s + n], ref) < 1e-5, (b, n, c)


# the ALiBi checkpoints served: name -> (CLASSIC_CONFIGS' arch, config overrides)
ALIBI_MODELS = {"bloom": ("bloom", {}),
                # (falcon-rw-1b's layer; its bias's rounding: test_kernels_round_falcons_bias)
                "falcon_rw": ("falcon_sequential", dict(alibi=True))}


# Falcon-RW-1B's shapes (32 heads of 64) with its bf16 bias: decode split (its merge too)
# and prefill over cached context; BLOOM's plain ALiBi prefill
_ALIBI_LAUNCHES = """
from loraplex.layers import triton_attention as A
for name in ("_decode_kernel", "_merge_splits_kernel", "_prefill_kernel"):
    setattr(A, name, Capture(getattr(A, name)))
kc, table = torch.zeros(8, 16, 32, 64, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.int32)
lens, q = torch.zeros(2, dtype=torch.int32), torch.zeros(2, 32, 64, dtype=torch.bfloat16)
slopes = torch.ones(32)
A.paged_decode_attention(q, kc, kc, table, lens, 0.1, num_splits=4, alibi_slopes=slopes,
                         alibi_bf16_scale=0.125)
qt = torch.zeros(24, 32, 64, dtype=torch.bfloat16)
for bf16_scale in (0.125, 0.0):
    A.prefill_attention(qt, qt, qt, torch.tensor([0, 10, 24], dtype=torch.int32), 14, 0.1,
                        kc, kc, table, lens, alibi_slopes=slopes, alibi_bf16_scale=bf16_scale)
"""


@pytest.mark.skipif(CUDA, reason="with CUDA the GPU tests compile the kernels for real")
def test_alibi_kernels_compile_for_h100():
    """The interpreter accepts code the compiler rejects (Falcon-RW's bit-level bfloat16
    rounding): compile its launches for sm_90, no GPU needed."""
    assert compile_for_h100(_ALIBI_LAUNCHES) == 4


@pytest.fixture(scope="module")
def alibi_models(tiny_root: Path) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Each of ALIBI_MODELS, built on first use, with an adapter on every linear (rank 8)
    and one on the fused q/k/v (rank 4)."""
    class Lazy(dict):
        def __missing__(self, name: str) -> tuple[Path, dict[str, Path]]:
            arch, overrides = ALIBI_MODELS[name]
            if not has_config(arch):
                pytest.skip(f"this transformers has no {arch}")
            seed = 410 + 10 * list(ALIBI_MODELS).index(name)
            base = make_classic_model(tiny_root / f"alibi_{name}", arch, seed, **overrides)
            specs = {"r8_all": dict(r=8, lora_alpha=16, target_modules="all-linear"),
                     "r4_qv": dict(r=4, lora_alpha=8, target_modules=["query_key_value"])}
            self[name] = base, {
                adapter: make_peft_adapter(base, tiny_root / f"alibi_{name}_{adapter}",
                                           seed=seed + 1 + i, **spec)
                for i, (adapter, spec) in enumerate(specs.items())}
            return self[name]
    return Lazy()


@pytest.mark.parametrize("name", list(ALIBI_MODELS))
def test_on_the_triton_kernels_matches_peft(monkeypatch, alibi_models, prompts, name):
    """The mixed batch of test_classic_architectures on the Triton attention kernels:
    prefill in chunks (each over the cached earlier ones) and decode."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", "triton")
    base, adapters = alibi_models[name]
    llm = make_llm(base, enable_lora=True, max_loras=1, max_lora_rank=8, block_size=8,
                   enable_chunked_prefill=True, max_num_batched_tokens=6)
    assert llm.llm_engine.model_runner.attn_backend == "triton"
    # (Falcon-RW: the three on the first prompt alone; the interpreter is slow)
    check_mixed_batch(llm, base, adapters, prompts, extra=2 if name == "bloom" else 0)


@pytest.mark.parametrize(("name", "backend"), [
    ("bloom", "torch"), ("bloom", "triton"), ("falcon_rw", "torch")])
def test_prefix_cache_matches_peft(monkeypatch, alibi_models, prompts, name, backend):
    """Requests that start from cached blocks (their keys' positions from the sequence's
    start, whatever computed them) give HF + PEFT's outputs on both backends (Falcon-RW's
    slopes differ from BLOOM's only in value: the torch backend's alone)."""
    monkeypatch.setenv("LORAPLEX_ATTENTION_BACKEND", backend)
    base, adapters = alibi_models[name]
    check_shared_prefixes(base, adapters, prompts)

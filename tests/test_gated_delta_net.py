"""The gated DeltaNet layer (layers/gated_delta_net.py) against transformers' torch
functions and layers (fp32): the chunked form and the recurrence against
torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule and against each other;
the whole layer, Qwen3-Next's fused projections (2 key heads, 4 value heads) and Qwen3.5's
split ones, against HF's Qwen3NextGatedDeltaNet / Qwen3_5GatedDeltaNet on a 30-token input
given as prompt chunks of 13 and 14 (each from the state the last left, over several
8-token chunks of the chunked form) and 3 decode steps."""

from __future__ import annotations

import pytest
import torch

from loraplex.layers.gated_delta_net import (
    GatedDeltaNet,
    GatedDeltaNetArgs,
    chunk_gated_delta_rule,
    l2_normed,
    recurrent_gated_delta_step,
)
from tests.test_hybrid import mixer_in_chunks

qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next",
                                 reason="transformers without Qwen3-Next (4.56)")


def _inputs(n: int, heads: int = 4, dk: int = 8, dv: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(n, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(n, heads, dv, generator=gen)
    g = -torch.rand(n, heads, generator=gen)  # log decays <= 0
    beta = torch.rand(n, heads, generator=gen)
    s0 = 0.3 * torch.randn(heads, dk, dv, generator=gen)
    return q, k, v, g, beta, s0


@torch.no_grad()
def test_chunked_and_recurrent_forms_match_hf():
    """19 tokens from a non-zero state: our chunked form (chunks of 8, the last padded)
    equals HF's chunked and recurrent functions, and ours step by step, outputs and state."""
    q, k, v, g, beta, s0 = _inputs(19)
    want, want_s = qwen3_next.torch_recurrent_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], initial_state=s0[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    hf_chunk, hf_chunk_s = qwen3_next.torch_chunk_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], chunk_size=8, initial_state=s0[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(hf_chunk, want, atol=1e-5, rtol=1e-5)
    qn, kn = l2_normed(q) * 8 ** -0.5, l2_normed(k)
    o, s = chunk_gated_delta_rule(qn, kn, v, g, beta, s0, 8)
    torch.testing.assert_close(o, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, want_s[0], atol=1e-5, rtol=1e-5)
    steps, state = [], s0[None]
    for t in range(19):
        out, state = recurrent_gated_delta_step(qn[t:t + 1], kn[t:t + 1], v[t:t + 1],
                                                g[t:t + 1], beta[t:t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], want_s[0], atol=1e-5, rtol=1e-5)


def _hf_config(**kw):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(hidden_size=64, num_hidden_layers=1, linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_key_head_dim=16,
                           linear_value_head_dim=8, linear_conv_kernel_dim=4,
                           layer_types=["linear_attention"], **kw)


@pytest.mark.parametrize("fused", [True, False], ids=["qwen3_next", "qwen3_5"])
@torch.no_grad()
def test_layer_matches_hf(fused):
    """HF's layer on 30 tokens at once against ours in two prompt chunks (chunked form of
    8-token chunks) and 3 decode steps; a fresh first chunk ignores what its slot held."""
    if fused:
        hf = qwen3_next.Qwen3NextGatedDeltaNet(_hf_config(), 0)
    else:
        qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
        hf = qwen3_5.Qwen3_5GatedDeltaNet(_hf_config(), 0)
    torch.manual_seed(0)
    for p in hf.parameters():
        p.normal_(0, 0.3)
    m = GatedDeltaNetArgs(2, 4, 16, 8, 4, 1e-6, fused_projections=fused, chunk_size=8)
    ours = GatedDeltaNet(64, m)
    ours.load_state_dict(hf.state_dict())
    ours.conv_state = torch.zeros(3, m.conv_dim, 3)
    ours.ssm_state = torch.zeros(3, 4, 16, 8)
    x = torch.randn(30, 64)
    want = hf(x[None])[0]
    got, again = mixer_in_chunks(ours, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, want[:13], atol=1e-5, rtol=1e-5)

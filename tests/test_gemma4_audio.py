"""Gemma 4's audio tower and embedder (models/gemma4_audio.py) against HF transformers'
Gemma4AudioModel + embed_audio (get_audio_features) on the same weights, fp32: clips of
different lengths through HF's Gemma4AudioFeatureExtractor (padded together there, each
alone here), under the shipped attention chunking and one with a right context, with
clipped linears and gradient clipping that bite; the soft-token count is
Gemma4Processor's. (The tower is not served yet: audio inputs are still refused.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers.models.gemma4",
                    reason="transformers < 5.5 has no Gemma 4 (the floors' 4.56)")

from loraplex.models.gemma4_audio import Gemma4AudioConfig, Gemma4AudioEncoder  # noqa: E402
from tests.gemma4_fixtures import gemma4_config  # noqa: E402

SHIPPED = {}  # chunk 12, left 13, right 0
RIGHT = dict(attention_chunk_size=4, attention_context_left=5, attention_context_right=3)


def hf_model(chunking: dict, seed: int) -> torch.nn.Module:
    """HF's Gemma4ForConditionalGeneration with a tiny random audio tower (the text model
    unused): weights of std 0.2, clip bounds on its first layer's feed-forward, gradient
    clipping at 4."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma4Config(text_config=gemma4_config(300).to_dict(), vision_config=None,
                       audio_config=dict(hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, output_proj_dims=24,
                                         subsampling_conv_channels=[128, 4],
                                         conv_kernel_size=5, gradient_clipping=4.0,
                                         **chunking))
    model = Gemma4ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "audio" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        ffw = model.model.audio_tower.layers[0].feed_forward1.ffw_layer_1
        ffw.input_min.fill_(-0.5)
        ffw.output_max.fill_(0.3)
    return model


def features(lengths: list[int]) -> dict[str, torch.Tensor]:
    """HF's feature extractor over random clips of `lengths` samples (16 kHz)."""
    from transformers import Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(len(lengths))
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    return Gemma4AudioFeatureExtractor()(clips, return_tensors="pt")


@pytest.mark.parametrize("chunking", [SHIPPED, RIGHT], ids=["shipped", "right-context"])
def test_audio_features_match_hf(chunking):
    """Tower + embedder: HF's get_audio_features (its real tokens) within 1e-5, for a
    1 s clip, a 0.44 s one and a 2.3 s one, batched there."""
    model = hf_model(chunking, seed=7)
    ours = Gemma4AudioEncoder(Gemma4AudioConfig.from_hf(model.config)).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()
                          if ".audio_tower." in k or ".embed_audio." in k})
    inp = features([16000, 7000, 36800])
    with torch.no_grad():
        ref = model.model.get_audio_features(inp["input_features"],
                                             inp["input_features_mask"])
        real = [f[m] for f, m in zip(inp["input_features"], inp["input_features_mask"])]
        got = ours(torch.cat(real), [len(f) for f in real])
    want = ref.pooler_output[ref.attention_mask]
    assert ref.attention_mask.sum(1).tolist() == [
        Gemma4AudioConfig.tokens_for(len(f)) for f in real]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_token_count_is_the_processors():
    """tokens_for over the extractor's real frames: Gemma4Processor's count for clips of
    any length (its _compute_audio_num_tokens and its mask rule)."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor

    extractor = Gemma4AudioFeatureExtractor()
    count = Gemma4Processor._compute_audio_num_tokens
    stand_in = type("P", (), {"feature_extractor": extractor, "audio_seq_length": 750})()
    for n in (400, 401, 559, 1600, 16000, 16001, 48123):
        mask = extractor([np.zeros(n, np.float32)], return_tensors="pt")["input_features_mask"]
        frames = int(mask.sum())
        assert Gemma4AudioConfig.tokens_for(frames) == count(stand_in, np.zeros(n), 16000), n


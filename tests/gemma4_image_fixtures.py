"""A tiny random Gemma 4 with images (Gemma4ForConditionalGeneration: a 2-layer vision
tower, its embedder, tests/gemma4_fixtures.py's text model) and its processor
(Gemma4Processor: HF's Gemma 4 image processor with 70 soft tokens at most, 4-pixel
patches pooled 2 x 2), saved as HF saves them: the ground truth of
tests/test_gemma4_images.py."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from tests.fixtures import _reinit_, _trained_tokenizer
from tests.gemma4_fixtures import gemma4_config

IMAGE, BOI, EOI, VIDEO = "<|image|>", "<|image>", "<image|>", "<|video|>"
AUDIO, BOA, EOA = "<|audio|>", "<|audio>", "<audio|>"
# Gemma 4's template's shape: an image part becomes <|image|>, a video part <|video|>, an
# audio part <|audio|>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<|image|>"
    "{% elif p['type'] == 'video' %}<|video|>{% elif p['type'] == 'audio' %}<|audio|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(out: Path) -> Any:
    """The session tokenizer with Gemma 4's image and audio tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer().to_str()), bos_token="<s>",
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=512,
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI,
                              "audio_token": AUDIO, "boa_token": BOA, "eoa_token": EOA,
                              "video_token": VIDEO})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


@torch.no_grad()
def make_tiny_gemma4_vision(out: Path, seed: int, image_blocks: bool = False,
                            image_soft_tokens: int = 70, video_soft_tokens: int | None = None,
                            audio: bool = False) -> Path:
    """The checkpoint and its processor in `out`; random weights of std 0.1.
    `image_blocks`: use_bidirectional_attention "vision" (an image's tokens see each other
    both ways on the sliding layers, whose window of 6 is shorter than an image), and no
    KV sharing (with it, the full layers' outputs at image rows reach no later layer's
    K/V: their causal rule would not show), and the tower's clipped linears (bounds that
    clip on its first layer's MLP). `image_soft_tokens`: the image processor's
    max_soft_tokens; `video_soft_tokens`: the video processor's, saved beside it (HF's
    Gemma4VideoProcessor, tests/gemma4_video_fixtures.py), or none saved. `audio`: a
    2-layer audio tower and its embedder too (HF's feature extractor's 128 mel bins)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    ids = tok.convert_tokens_to_ids
    blocks = {"use_bidirectional_attention": "vision", "num_kv_shared_layers": 0}
    text = gemma4_config(len(tok), **(blocks if image_blocks else {})).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4,
                  pooling_kernel_size=2, position_embedding_size=160, standardize=True,
                  use_clipped_linears=image_blocks)
    sound = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 subsampling_conv_channels=[128, 4], output_proj_dims=24, conv_kernel_size=5)
    cfg = Gemma4Config(text_config=text, vision_config=vision,
                       audio_config=sound if audio else None,
                       image_token_id=ids(IMAGE), boi_token_id=ids(BOI),
                       eoi_token_id=ids(EOI), audio_token_id=ids(AUDIO),
                       boa_token_id=ids(BOA), eoa_token_index=ids(EOA),
                       video_token_id=ids(VIDEO))
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    tower = model.model.vision_tower
    tower.std_bias.copy_(0.1 * torch.randn(tower.std_bias.shape, generator=gen))
    tower.std_scale.copy_(1.0 + 0.2 * torch.randn(tower.std_scale.shape, generator=gen))
    if image_blocks:
        mlp = tower.encoder.layers[0].mlp
        for linear, bound in ((mlp.gate_proj, 0.3), (mlp.up_proj, 0.2), (mlp.down_proj, 0.1)):
            linear.input_min.fill_(-4 * bound)
            linear.input_max.fill_(4 * bound)
            linear.output_min.fill_(-bound)
            linear.output_max.fill_(bound)
    for layer in model.model.language_model.layers:
        layer.layer_scalar.copy_(0.8 + 0.4 * torch.rand(1, generator=gen))
    model.save_pretrained(str(out))
    Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2,
                            max_soft_tokens=image_soft_tokens).save_pretrained(str(out))
    if video_soft_tokens is not None:
        from tests.gemma4_video_fixtures import video_processor

        video_processor(video_soft_tokens).save_pretrained(str(out))
    return out


@functools.lru_cache(maxsize=2)
def processor(base: str) -> Any:
    """HF's Gemma4Processor over the checkpoint's tokenizer, image processor and video
    processor (HF's Gemma4VideoProcessor, tests/gemma4_video_fixtures.py: the one saved
    beside the checkpoint, else its defaults at this tower's patch sizes; ProcessorMixin's
    class check, which looks it up among torchvision's, let through for it alone)."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Gemma4AudioFeatureExtractor,
        Gemma4Processor,
    )
    from transformers.processing_utils import ProcessorMixin

    from tests.gemma4_video_fixtures import video_processor

    saved = Path(base) / "video_preprocessor_config.json"
    check = ProcessorMixin.check_argument_for_proper_class

    def video_as_is(self: Any, name: str, arg: Any) -> Any:
        return None if name == "video_processor" else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = video_as_is
    try:
        return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                               image_processor=AutoImageProcessor.from_pretrained(base),
                               tokenizer=AutoTokenizer.from_pretrained(base),
                               video_processor=video_processor(
                                   path=saved if saved.is_file() else None))
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True,
              videos: list | None = None, audio: list | None = None
              ) -> dict[str, torch.Tensor]:
    """What HF's processor makes of a prompt and its images (and videos: (frames,
    metadata) pairs, frames at their resized size, tests/gemma4_video_fixtures.py), as
    the model takes them (no attention mask: all ones). `audio`: 16 kHz waveforms."""
    extra = {"audio": audio} if audio else {}
    if videos:
        extra |= {"videos": [f for f, _ in videos], "do_sample_frames": False,
                 "do_convert_rgb": False, "video_metadata": [m for _, m in videos]}
    out = processor(str(base))(text=prompt, images=images or None, return_tensors="pt",
                               add_special_tokens=add_special_tokens, **extra)
    return {k: v for k, v in out.items() if k not in (
        "num_soft_tokens_per_image", "num_soft_tokens_per_video", "attention_mask",
        "video_metadata")}


def check_against_hf(outs, base: Path, jobs: list, add_special_tokens: bool = True) -> None:
    """Each output's prompt ids are HF's processor's, its tokens HF's greedy ones and its
    logprobs HF's (+ PEFT's) within 1e-4. `jobs`: (prompt, images, videos, audio clips,
    adapter) per output."""
    from tests.multimodal_fixtures import assert_matches_reference, hf_logprobs

    for out, (prompt, images, videos, clips, adapter) in zip(outs, jobs, strict=True):
        inp = hf_inputs(base, prompt, list(images), add_special_tokens, videos=list(videos),
                        audio=list(clips))
        ids = inp["input_ids"][0].tolist()
        assert out.prompt_token_ids == ids
        got = out.outputs[0].token_ids
        ref = hf_logprobs(base, adapter, inp, got[:-1])[len(ids) - 1:]
        assert_matches_reference(out, ref, adapter)


def gemma4_llm(base: Path, **kw) -> Any:
    """tests/engine_utils.py's make_llm with room for videos and clips (max_model_len 512)."""
    from tests.engine_utils import make_llm

    kw.setdefault("max_model_len", 512)
    return make_llm(base, **kw)

"""A tiny random InternVL (InternVLForConditionalGeneration: InternViT, pixel shuffle, MLP
projector, a Qwen2 or Qwen3 language model), its image processor and tokenizer (with
`<img>`, `</img>`, `<IMG_CONTEXT>`, `<video>` named as InternVLProcessor reads them),
PEFT adapters on it, and HF transformers (+ PEFT) as the reference: the ground truth of
tests/test_internvl.py.

HF's InternVLProcessor needs torchvision (its video processor), which this environment
lacks: the reference prompt is expanded here by its rule, on the text before tokenizing
as it does (each `<IMG_CONTEXT>` becomes `<img>`, image_seq_length x the image's tiles
`<IMG_CONTEXT>`, `</img>`), the tiles and pixels from the checkpoint's image processor
with InternVLProcessor's crop_to_patches. Videos the same way: each `<video>` becomes
InternVLProcessor's "Frame{i}: <img>...</img>" lines in the text, and each frame (given at
the tile's size, so InternVLVideoProcessor's torchvision resize leaves it) is normalized by
the image processor as one tile: HF's pixels for frames the video processor does not
resize, its mean and std being the image processor's (the hub's files agree so)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from loraplex import SamplingParams
from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import (  # noqa: F401 (some re-exported for the tests)
    check_jobs,
    hf_logprobs,
    image_processor,
    make_multimodal_adapter,
    tokenizer,
    with_adapters,
)

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
TILE, PATCH, SEQ = 16, 4, 4  # 16-pixel tiles of 4 x 4 patches, folded 2 x 2: 4 tokens a tile
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "USER: <IMG_CONTEXT>\nWhat is this? ASSISTANT:"
VIDEO_ASK = "USER: <video>\nWhat happens? ASSISTANT:"


def make_tiny_internvl(out: Path, seed: int, text: str = "qwen2", tied: bool = False,
                       feature_layer: int = -1, final_norm: bool = True) -> Path:
    """A 2-layer language model (`text`: qwen2, qwen3 or llama; `tied`: lm_head the
    embedding, as InternVL3-1B's) behind a 2-layer InternViT (RMSNorms, q / k norms, a
    final LayerNorm: InternViT-6B's options) on 16-pixel tiles, at most 6 tiles an image,
    its features from `feature_layer` (vision_feature_layer), `final_norm` false: no
    final LayerNorm (use_mean_pooling, the remote layout's tower); ImageNet's mean and std
    (the hub's); weights std 0.2."""
    from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS.values())})
    tok.save_pretrained(str(out))
    path = out / "tokenizer_config.json"  # the tokens' names, as the hub's files give them
    tok_config = json.loads(path.read_text())
    tok_config["extra_special_tokens"] = IMAGE_TOKENS
    path.write_text(json.dumps(tok_config))
    tok = AutoTokenizer.from_pretrained(str(out))
    lm = dict(model_type=text, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, pad_token_id=3, tie_word_embeddings=tied)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=TILE, patch_size=PATCH, use_qk_norm=True,
                  norm_type="rms_norm", use_mean_pooling=not final_norm, hidden_act="gelu")
    cfg = InternVLConfig(text_config=lm, vision_config=vision, image_seq_length=SEQ,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         downsample_ratio=0.5, tie_word_embeddings=tied,
                         vision_feature_layer=feature_layer)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    processor_class().from_dict(
        {"size": {"height": TILE, "width": TILE}, "max_patches": 6, "min_patches": 1,
         "crop_to_patches": False, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}).save_pretrained(str(out))  # (the hub's)
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": SEQ}))
    saved = json.loads((out / "preprocessor_config.json").read_text())
    (out / "video_preprocessor_config.json").write_text(json.dumps(  # the hub's keys
        {"video_processor_type": "InternVLVideoProcessor", "size": {"height": TILE,
         "width": TILE}, "resample": 3, "do_resize": True, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
         "image_mean": saved["image_mean"], "image_std": saved["image_std"]}))
    return out


def video(seed: int, frames: int = 3, size: int = TILE) -> np.ndarray:
    """[frames, size, size, 3] uint8 random frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def processor_class() -> type:
    """HF's GotOcr2 image processor that needs no torchvision (transformers 5: the PIL
    one)."""
    import transformers

    return getattr(transformers, "GotOcr2ImageProcessorPil", None) \
        or transformers.GotOcr2ImageProcessor


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True,
              videos: tuple = ()) -> dict[str, torch.Tensor]:
    """The prompt's ids with each `<IMG_CONTEXT>` and `<video>` expanded by
    InternVLProcessor's rule (on the text), and the tiles' and frames' pixels in prompt
    order, from HF's tokenizer and image processor."""
    from PIL import Image

    proc = image_processor(str(base))
    tiles, texts = [], []
    for im in images:
        out = proc(images=[im], crop_to_patches=True, return_tensors="pt")
        tiles.append(out["pixel_values"])
        texts.append(f"<img>{'<IMG_CONTEXT>' * SEQ * int(out['num_patches'][0])}</img>")
    frames, lines = [], []
    for v in videos:
        frames.append(torch.cat([proc(images=[Image.fromarray(f)], crop_to_patches=False,
                                      return_tensors="pt")["pixel_values"] for f in v]))
        lines.append("\n".join(f"Frame{i + 1}: <img>{'<IMG_CONTEXT>' * SEQ}</img>"
                               for i in range(len(v))))
    left = {"<IMG_CONTEXT>": iter(zip(tiles, texts)), "<video>": iter(zip(frames, lines))}
    pixels = []

    def expand(m: re.Match) -> str:
        p, text = next(left[m.group()])
        pixels.append(p)
        return text
    prompt = re.sub("<IMG_CONTEXT>|<video>", expand, prompt)
    ids = tokenizer(str(base))(prompt, add_special_tokens=add_special_tokens).input_ids
    out = {"input_ids": torch.tensor([ids])}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def check(outs, base: Path, jobs: list[tuple[str, list, Path | None]],
          add_special_tokens: bool = True) -> None:
    """check_jobs with this model's hf_inputs."""
    check_jobs(outs, base, jobs, hf_inputs, add_special_tokens)


def check_media(outs, base: Path, jobs: list[tuple[str, list, list, Path | None]],
                add_special_tokens: bool = True) -> None:
    """check_jobs of (prompt, images, videos, adapter) jobs."""
    check_jobs(outs, base, [(p, (ims, vids), a) for p, ims, vids, a in jobs],
               lambda b, p, media, add: hf_inputs(b, p, media[0], add, media[1]),
               add_special_tokens)


def media_request(prompt: str, images: list, videos: list) -> dict | str:
    """`prompt` with its images and videos as multi_modal_data (alone without)."""
    data = {k: v for k, v in (("image", images), ("video", videos)) if v}
    return {"prompt": prompt, "multi_modal_data": data} if data else prompt

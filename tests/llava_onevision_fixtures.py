"""A tiny random LLaVA-OneVision (LlavaOnevisionForConditionalGeneration: SigLIP tower,
projector, `image_newline`, Qwen2) with anyres pinpoints small enough that a large image
goes over the anyres_max budget, its processor (HF's LlavaOnevisionProcessor built in
memory: its video processor needs torchvision, not installed here), PEFT adapters on it,
and HF transformers (+ PEFT) as the reference: the ground truth of
tests/test_llava_onevision.py.

Videos: HF's frames are given at the tower's size, so LlavaOnevisionVideoProcessor's
torchvision resize leaves them; its rescale and normalization (CLIP's mean and std) are
redone here per frame in HF's fused form, and each `<video>`'s count is
LlavaOnevisionProcessor.replace_video_token's."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraplex import SamplingParams
from tests.fixtures import _reinit_, make_tokenizer
from tests.internvl_fixtures import media_request  # noqa: F401 (re-exported)
from tests.multimodal_fixtures import check_jobs, tokenizer

IMAGE, VIDEO = "<image>", "<video>"
# 20-pixel tiles of 5 x 5 patches (an odd side, as the hub's 27: a video frame's 2 x 2
# bilinear pooling to 3 x 3 is no plain average then)
TILE, PATCH = 20, 4
# (height, width) in whole tiles: up to 3 x 3, so an image fills 9 tiles of features
PINPOINTS = [[20, 20], [20, 40], [40, 20], [40, 40], [20, 60], [60, 20], [60, 60]]
MAX = "anyres_max_2"  # a budget of 2 tiles' patches: 2 x 2 tiles and more are reduced
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
ASK = "USER: <image>\nWhat is this? ASSISTANT:"
VIDEO_ASK = "USER: <video>\nWhat happens? ASSISTANT:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_tiny_onevision(out: Path, seed: int, aspect: str = MAX) -> Path:
    """Tokenizer with `<image>` and `<video>`, a 2-layer SigLIP tower read at its last
    layer ("full"), a 2-layer Qwen2, every weight (image_newline too) drawn with std 0.2,
    the image processor's config (PIL) and processor_config.json saved."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE, VIDEO]})
    tok.save_pretrained(str(out))
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1,
                       eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=TILE, patch_size=PATCH,
                                vision_use_head=False)
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision,
                               image_token_index=tok.convert_tokens_to_ids(IMAGE),
                               video_token_index=tok.convert_tokens_to_ids(VIDEO),
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    image_processor_class()(size={"height": TILE, "width": TILE},
                            image_grid_pinpoints=PINPOINTS).save_pretrained(str(out))
    (out / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (TILE // PATCH) ** 2,
         "vision_feature_select_strategy": "full", "vision_aspect_ratio": aspect}))
    return out


def image_processor_class() -> type:
    """HF's LLaVA-OneVision image processor that needs no torchvision (transformers 5: the
    PIL one)."""
    import transformers

    return getattr(transformers, "LlavaOnevisionImageProcessorPil", None) \
        or transformers.LlavaOnevisionImageProcessor


@functools.lru_cache(maxsize=4)
def processor(base: str) -> Any:
    """HF's LlavaOnevisionProcessor of the checkpoint, built without a video processor."""
    from transformers import LlavaOnevisionProcessor

    class WithoutVideoProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name: str, argument: Any) -> Any:
            if argument is not None:
                return super().check_argument_for_proper_class(name, argument)

    cfg = json.loads((Path(base) / "processor_config.json").read_text())
    cfg.pop("processor_class")
    return WithoutVideoProcessor(image_processor=image_processor_class().from_pretrained(base),
                                 tokenizer=tokenizer(base), **cfg)


def video(seed: int, frames: int = 3, size: int = TILE) -> np.ndarray:
    """[frames, size, size, 3] uint8 random frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def video_pixels(frames: np.ndarray) -> torch.Tensor:
    """[T, 3, TILE, TILE]: HF's video processor's pixels of frames at the tower's size (no
    resize), rescaled and normalized in its fused step."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
    mean = torch.tensor(CLIP_MEAN) * 255
    std = torch.tensor(CLIP_STD) * 255
    return (x - mean[:, None, None]) / std[:, None, None]


def hf_inputs(base: Path, prompt: str, images: list, add_special_tokens: bool = True,
              videos: tuple = ()) -> dict[str, torch.Tensor]:
    """HF's processor's ids and pixels for a prompt with images and videos: without
    videos LlavaOnevisionProcessor itself; with them its replace_image_token and
    replace_video_token (on the frames' pixels, video_pixels) written into the text in
    place of each `<image>` / `<video>`, then tokenized, as its __call__ does."""
    proc = processor(str(base))
    if not videos:
        out = dict(proc(text=prompt, images=images or None, return_tensors="pt",
                        add_special_tokens=add_special_tokens))
        for key in ("batch_num_images", "attention_mask"):  # (more tokens go after the ids)
            out.pop(key, None)
        return out
    clips = [video_pixels(v) for v in videos]
    # (HF's model takes videos of one length a prompt: others' pixels only, in a list)
    same = len({len(c) for c in clips}) == 1
    out: dict[str, Any] = {"pixel_values_videos": torch.stack(clips) if same else clips}
    pieces = {VIDEO: iter(_video_text(proc, clips, i) for i in range(len(clips)))}
    if images:
        pixels = proc.image_processor(images, return_tensors="pt")
        pieces[IMAGE] = iter(_image_text(proc, pixels, i) for i in range(len(images)))
        out.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    text = re.sub(f"{re.escape(IMAGE)}|{re.escape(VIDEO)}", lambda m: next(pieces[m.group()]),
                  prompt)
    ids = tokenizer(str(base))(text, add_special_tokens=add_special_tokens).input_ids
    return {"input_ids": torch.tensor([ids]), **out}


def _video_text(proc: Any, clips: list[torch.Tensor], i: int) -> str:
    """Video i's `<video>`s as LlavaOnevisionProcessor writes them (transformers 4.x: its
    __call__'s own rule, inline there)."""
    if hasattr(proc, "replace_video_token"):
        return proc.replace_video_token({"pixel_values_videos": clips}, i)
    pooled = math.ceil(int(math.sqrt(proc.num_image_tokens)) / 2)
    return VIDEO * (len(clips[i]) * pooled * pooled + 1)


def _image_text(proc: Any, pixels: Any, i: int) -> str:
    """Image i's `<image>`s as LlavaOnevisionProcessor writes them (transformers 4.x:
    its _get_number_of_features, which its __call__ reads)."""
    if hasattr(proc, "replace_image_token"):
        return proc.replace_image_token(pixels, i)
    height, width = pixels["image_sizes"][i].tolist()
    return IMAGE * proc._get_number_of_features(height, width, TILE, TILE)


def check_media(outs, base: Path, jobs: list[tuple[str, list, list, Path | None]],
                add_special_tokens: bool = True) -> None:
    """check_jobs of (prompt, images, videos, adapter) jobs."""
    check_jobs(outs, base, [(p, (ims, vids), a) for p, ims, vids, a in jobs],
               lambda b, p, media, add: hf_inputs(b, p, media[0], add, media[1]),
               add_special_tokens)

"""A tiny random LFM2-VL (Lfm2VlForConditionalGeneration: tests/test_lfm2.py's LFM2 behind
a 2-layer SigLIP2 NaFlex tower on 4-pixel patches, a 4 x 4 position table, the projector
over 2 x 2 folds), its image processor settings (16-pixel tiles, 2..4 tiles, 2..8 tokens
an image) and tokenizer (`<image>`, `<|image_start|>`, `<|image_end|>`,
`<|img_thumbnail|>`, `<|img_row_R_col_C|>`), and HF's own processor and model as the
reference: the ground truth of tests/test_lfm2_vl_images.py.

HF's Lfm2VlImageProcessor needs torchvision (absent here) for two calls only: its resize
and normalize. `hf_processor` loads HF's module with torchvision stubbed and runs HF's
Lfm2VlProcessor whole (tiling, thumbnail, patches, padding, the prompt's expansion), those
two calls standing in: torchvision's bilinear antialiased uint8 resize by
loraplex/engine/llama4_images.py's rule, its normalize by its formula. With torchvision
installed, HF's processor runs as it is."""

from __future__ import annotations

import functools
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tests.fixtures import _reinit_, make_tokenizer
from tests.multimodal_fixtures import with_peft, without_torchvision

PATCH, TILE, MAX_TILES = 4, 16, 4
MARKERS = ["<image>", "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>"] + [
    f"<|img_row_{r}_col_{c}|>" for r in range(1, MAX_TILES + 1) for c in range(1, MAX_TILES + 1)]
PREPROCESSOR = dict(image_processor_type="Lfm2VlImageProcessor", encoder_patch_size=PATCH,
                    tile_size=TILE, min_tiles=2, max_tiles=MAX_TILES, min_image_tokens=2,
                    max_image_tokens=8, downsample_factor=2, use_thumbnail=True,
                    do_image_splitting=True, max_pixels_tolerance=2.0,
                    image_mean=[0.5, 0.4, 0.3], image_std=[0.5, 0.6, 0.7])
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tiny_lfm2_vl(out: Path, seed: int) -> Path:
    """The checkpoint, its preprocessor_config.json and tokenizer in `out`; weights of std
    0.2."""
    import transformers

    from tests.test_lfm2 import lfm2_config

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_patches=16,
                  patch_size=PATCH, vision_use_head=False)
    cfg = transformers.Lfm2VlConfig(text_config=lfm2_config(len(tok)).to_dict(),
                                    vision_config=vision, projector_hidden_size=48,
                                    image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = transformers.Lfm2VlForConditionalGeneration(cfg).eval()
    _reinit_(model, seed, 0.2)
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return out


def _hf_image_processor_class() -> type:
    """HF's Lfm2VlImageProcessor (its module loaded with torchvision stubbed when absent)."""
    try:
        import torchvision  # noqa: F401
        from transformers import Lfm2VlImageProcessor

        return Lfm2VlImageProcessor
    except ImportError:
        pass
    return without_torchvision(
        "models/lfm2_vl/image_processing_lfm2_vl.py",
        "transformers.models.lfm2_vl._image_processing_without_torchvision"
    ).Lfm2VlImageProcessor


@contextmanager
def _torchvision_standins():
    """TorchvisionBackend's resize (bilinear, antialias) and normalize by torchvision's
    rules while torchvision is absent; nothing when it is installed."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    from transformers.image_processing_backends import TorchvisionBackend

    from loraplex.engine.llama4_images import resize

    def tv_resize(self, image, size, resample=None, antialias=True, **kwargs):
        assert resample in (None, 2) and antialias, (resample, antialias)
        return resize(image, (size.height, size.width))

    def tv_normalize(self, image, mean, std, inplace=False, **kwargs):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image if inplace else image.clone()).sub_(mean).div_(std)

    saved = TorchvisionBackend.resize, TorchvisionBackend.normalize
    TorchvisionBackend.resize, TorchvisionBackend.normalize = tv_resize, tv_normalize
    try:
        yield
    finally:
        TorchvisionBackend.resize, TorchvisionBackend.normalize = saved


@functools.lru_cache(maxsize=4)
def hf_processor_of(base: str) -> Any:
    """HF's Lfm2VlProcessor of the tiny checkpoint (cached)."""
    from transformers import AutoTokenizer
    from transformers.models.lfm2_vl.processing_lfm2_vl import Lfm2VlProcessor

    kwargs = {k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
    return Lfm2VlProcessor(_hf_image_processor_class()(**kwargs),
                           AutoTokenizer.from_pretrained(base))


def hf_processor(base: Path, prompt: str, images: list, **kwargs: Any
                 ) -> dict[str, torch.Tensor]:
    """HF's Lfm2VlProcessor on `prompt` and its images (`kwargs`: its image options):
    input_ids (no BOS: the processor's add_special_tokens=False), pixel_values,
    pixel_attention_mask, spatial_shapes."""
    with _torchvision_standins():
        out = hf_processor_of(str(base))(text=[prompt], images=[images] if images else None,
                                         return_tensors="pt", **kwargs)
    return dict(out)


@functools.lru_cache(maxsize=8)
def hf_model(base: str, adapter: str | None) -> torch.nn.Module:
    """HF's Lfm2VlForConditionalGeneration (+ PEFT), fp32."""
    import transformers

    model = transformers.Lfm2VlForConditionalGeneration.from_pretrained(
        base, dtype=torch.float32).eval()
    return with_peft(model, adapter)


@torch.no_grad()
def hf_logprobs(base: Path, adapter: Path | None, inputs: dict[str, torch.Tensor],
                more: list[int]) -> torch.Tensor:
    """HF's log-softmax over the processed `inputs` and `more` tokens after them."""
    model = hf_model(str(base), None if adapter is None else str(adapter))
    kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
    kw["input_ids"] = torch.cat([inputs["input_ids"],
                                 torch.tensor([more], dtype=torch.long)], dim=1)
    return torch.log_softmax(model(**kw).logits[0].float(), dim=-1)


def make_adapter(base: Path, out: Path, r: int, seed: int, targets: Any) -> Path:
    """A PEFT adapter on the whole VL model (`targets`: PEFT's target_modules), A and B
    random."""
    from tests.multimodal_fixtures import make_multimodal_adapter

    model = hf_model.__wrapped__(str(base), None)
    return make_multimodal_adapter(base, out, r=r, seed=seed, targets=targets, model=model)

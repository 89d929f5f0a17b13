"""LLaVA's image path (Liu et al., "Visual Instruction Tuning"; LLaVA-1.5): a CLIP ViT
encodes the image, the hidden states of one of its layers (`vision_feature_layer`, -2 in
LLaVA-1.5) less the CLS token ("default") or with it ("full") go through a two-layer MLP
with a GELU (the projector), and each patch's vector takes the place of one image
placeholder token in the language model's input embeddings.

The language model is loraplex's Llama (models/llama.py), with its paged KV cache and its
LoRA; this module is only the encoder side, run once per request (engine/images.py).
Adapters' LoRA applies to the language model only (models/text_only.py names).

LLaVA-NeXT (`LlavaNextForConditionalGeneration`, LLaVA-1.6) adds "anyres": the image
processor resizes and pads the image to the best of `image_grid_pinpoints` and cuts it into
tiles of the tower's size after a downscaled whole-image tile; the tower and projector run
on every tile, and `anyres_layout` arranges the grid tiles' patch vectors as HF does (rows
across tiles, the padding rows or columns removed, an `image_newline` vector closing each
row) after the base tile's. An image's placeholder count so depends on its size
(`LlavaVisionConfig.tokens_for`).

Checkpoints name the tower `vision_tower.vision_model.*` (the hub's files, transformers 4),
`model.vision_tower.vision_model.*` (saved by 4.52+) or `vision_tower.*` (saved by 5):
`LlavaVision.load_weight` takes all three (and `image_newline` or `model.image_newline`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the vision towers' activations (CLIP's quick GELU, SigLIP's tanh GELU, Qwen2.5-VL's SiLU)
VISION_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
                      "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                      "silu": F.silu}


def check_activation(field: str, act: str) -> None:
    """A vision config's activation, refused at start-up when no tower has it."""
    if act not in VISION_ACTIVATIONS:
        raise ValueError(f"{field}={act!r} is not supported; supported: "
                         + ", ".join(VISION_ACTIVATIONS))


def check_tower(model: str, vision_config: Any, model_type: str, tower: str) -> None:
    """A checkpoint's vision tower is the one loraplex builds for its family (configs that
    name no model_type are taken as that one); another is refused at start-up."""
    kind = getattr(vision_config, "model_type", model_type)
    if kind != model_type:
        raise ValueError(f"{model} with a {kind!r} vision tower is not supported (a {tower} "
                         "one is)")


@dataclass(frozen=True)
class TowerConfig:
    """What the ViT reads of a model's vision config: the fields LlavaVisionConfig and
    Gemma 3's (models/gemma3_vision.py) start with."""

    hidden_size: int  # the tower's
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str  # the tower's MLP (CLIP: quick_gelu)
    feature_layers: tuple[int, ...]  # hidden states taken (index into [embeddings, layer 1..])

    @staticmethod
    def fields_of(v: Any, feature_layers: tuple[int, ...]) -> tuple:
        """These fields' values from an HF vision config, in order."""
        return (v.hidden_size, v.intermediate_size, v.num_hidden_layers,
                v.num_attention_heads, v.image_size, v.patch_size,
                getattr(v, "num_channels", 3), v.layer_norm_eps, v.hidden_act, feature_layers)


@dataclass(frozen=True)
class LlavaVisionConfig(TowerConfig):
    keep_cls: bool  # vision_feature_select_strategy "full"
    text_hidden_size: int
    projector_act: str
    projector_bias: bool
    image_token_id: int
    # LLaVA-NeXT's anyres resolutions, (height, width) each; None: LLaVA-1.5, one tile
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    siglip: bool = False  # a SigLIP tower (LLaVA-OneVision's: models/llava_onevision.py)

    @classmethod
    def from_hf(cls, hf: Any) -> LlavaVisionConfig:
        v = hf.vision_config
        check_tower("LLaVA", v, "clip_vision_model", "CLIP")
        check_activation("vision_config.hidden_act", v.hidden_act)
        check_activation("projector_hidden_act", hf.projector_hidden_act)
        strategy = hf.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported "
                             "(default, full)")
        layers = hf.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        token = getattr(hf, "image_token_id", None)
        pinpoints = None
        if getattr(hf, "model_type", None) == "llava_next":
            pinpoints = tuple((int(h), int(w)) for h, w in hf.image_grid_pinpoints)
            if strategy != "default" or any(x % v.image_size for p in pinpoints for x in p):
                # HF's LLaVA-NeXT lays a tile out as a square of patches (no CLS) and its
                # grid in whole tiles: with "full" or such pinpoints its model fails on
                # every image (transformers 5.x, tests/test_llava_next.py), vLLM's
                # refuses "full": there is no output to match
                raise ValueError("LLaVA-NeXT is supported with vision_feature_select_strategy "
                                 "'default' and image_grid_pinpoints that are multiples of "
                                 f"the tower's image_size {v.image_size} (HF's and vLLM's "
                                 "LLaVA-NeXT run no other)")
        return cls(*cls.fields_of(v, tuple(i % (v.num_hidden_layers + 1) for i in layers)),
                   strategy == "full",
                   hf.text_config.hidden_size, hf.projector_hidden_act,
                   bool(getattr(hf, "multimodal_projector_bias", True)),
                   int(token if token is not None else hf.image_token_index), pinpoints)

    @property
    def placeholder_id(self) -> int:
        """The token a prompt puts where an image goes (expanded to tokens_for of it)."""
        return self.image_token_id

    @property
    def bidirectional(self) -> bool:
        """Whether an image's tokens attend to each other both ways (Gemma 3's; LLaVA's
        are causal like text)."""
        return False

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens one image takes: a vector per patch (and the CLS's, "full")."""
        return (self.image_size // self.patch_size) ** 2 + self.keep_cls

    def tiles(self, size: tuple[int, int]) -> int:
        """Tiles an image of `size` (height, width) is cut into (the base one included)."""
        if self.grid_pinpoints is None:
            return 1
        down, across, _, _ = anyres_grid(self, size)
        return down * across + 1

    def tokens_for(self, size: tuple[int, int]) -> int:
        """Placeholder tokens an image of `size` (height, width) takes: LLaVA-NeXT's base
        tile, then each unpadded row of the grid's patches and its image_newline (what
        HF's LlavaNextProcessor counts)."""
        if self.grid_pinpoints is None:
            return self.tokens_per_image
        _, _, rows, cols = anyres_grid(self, size)
        return self.tokens_per_image + (rows.stop - rows.start) * (cols.stop - cols.start + 1)


def placeholder_runs(ids: list[int], token: int) -> list[int]:
    """The lengths of the runs of `token` in a prompt (its images' expanded
    placeholders)."""
    runs: list[int] = []
    for i, t in enumerate(ids):
        if t == token:
            if i and ids[i - 1] == token:
                runs[-1] += 1
            else:
                runs.append(1)
    return runs


def anyres_grid(c: LlavaVisionConfig, size: tuple[int, int]) -> tuple[int, int, slice, slice]:
    """(tiles down, tiles across, the rows and columns of the grid's patch map that hold
    the image) for an image of `size` (height, width): the best pinpoint, as HF's image
    processor picks it, less the padding that kept the image's aspect ratio."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution(size, [list(p) for p in c.grid_pinpoints or ()])
    down, across = best_h // c.image_size, best_w // c.image_size
    side = c.image_size // c.patch_size
    height, width = down * side, across * side
    h, w = size
    if w / h > width / height:  # wider than the grid: padded above and below
        pad = (height - int(round(h * (width / w), 7))) // 2
        return down, across, slice(pad, height - pad), slice(0, width)
    pad = (width - int(round(w * (height / h), 7))) // 2
    return down, across, slice(0, height), slice(pad, width - pad)


def anyres_layout(c: LlavaVisionConfig, features: torch.Tensor, size: tuple[int, int],
                  newline: torch.Tensor) -> torch.Tensor:
    """One image's tile features [1 + tiles, patches, D] in HF LLaVA-NeXT's order: the
    base tile's patches, then the grid's patch rows (across its tiles), unpadded, each
    row followed by `newline`."""
    return torch.cat([features[0], with_newlines(unpadded_grid(c, features, size), newline)])


def unpadded_grid(c: LlavaVisionConfig, features: torch.Tensor, size: tuple[int, int]
                  ) -> torch.Tensor:
    """The grid tiles' features of one image's [1 + tiles, patches, D] as one patch map
    [rows, columns, D] across its tiles, the padding rows or columns removed."""
    down, across, rows, cols = anyres_grid(c, size)
    side = c.image_size // c.patch_size
    grid = features[1:].view(down, across, side, side, -1).permute(0, 2, 1, 3, 4)
    return grid.reshape(down * side, across * side, -1)[rows, cols]


def with_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """A patch map [rows, columns, D] row after row, `newline` after each row."""
    grid = torch.cat([grid, newline.to(grid.dtype).expand(grid.shape[0], 1, -1)], dim=1)
    return grid.flatten(0, 1)


class CLIPEmbeddings(nn.Module):
    """Patches by a strided convolution, a learned CLS vector first, learned positions.
    SigLIP's (`siglip`): the convolution has a bias, there is no CLS vector."""

    def __init__(self, c: TowerConfig, siglip: bool = False) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         stride=c.patch_size, bias=siglip)
        self.class_embedding = None if siglip else nn.Parameter(torch.empty(c.hidden_size))
        num_positions = (c.image_size // c.patch_size) ** 2 + (not siglip)
        self.position_embedding = nn.Embedding(num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, P, D]
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(patches.shape[0], 1, -1)
            patches = torch.cat([cls, patches], dim=1)
        return patches + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Full (bidirectional) multi-head attention over an image's tokens."""

    def __init__(self, c: TowerConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale: head_dim^-1/2, as CLIP
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, c: TowerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = VISION_ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, c: TowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, c: TowerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_layers))


class CLIPVisionTower(nn.Module):
    """CLIP's ViT up to the last layer LLaVA reads (post_layernorm, on the pooled CLS, is
    never used: its weights are skipped). SigLIP's (`siglip`, Gemma 3's tower) is the same
    ViT without the CLS vector and the pre-layernorm, with a bias on the patch
    convolution, and its post_layernorm on every patch of the last layer's output (its
    `last_hidden_state`, which Gemma 3 reads)."""

    def __init__(self, c: TowerConfig, siglip: bool = False, post_norm: bool = True) -> None:
        """`post_norm` false: SigLIP's hidden states of `feature_layers` as CLIP's are
        read (LLaVA-OneVision's: no post_layernorm)."""
        super().__init__()
        self.embeddings = CLIPEmbeddings(c, siglip)
        norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if not siglip:
            self.pre_layrnorm = norm  # CLIP's name
        elif post_norm:
            self.post_layernorm = norm
        self.siglip = siglip
        self.post_norm = siglip and post_norm
        self.encoder = CLIPEncoder(c)
        self.feature_layers = c.feature_layers

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The hidden states of `feature_layers` (0: the embeddings, i: after layer i;
        SigLIP: the last layer's, after post_layernorm)."""
        x = self.embeddings(pixels)
        if not self.siglip:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers[:max(self.feature_layers)]:
            x = layer(x)
            states.append(x)
        if self.post_norm:
            return [self.post_layernorm(x)]
        return [states[i] for i in self.feature_layers]


class LlavaProjector(nn.Module):
    def __init__(self, c: LlavaVisionConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(c.hidden_size * len(c.feature_layers), c.text_hidden_size,
                                  bias=c.projector_bias)
        self.linear_2 = nn.Linear(c.text_hidden_size, c.text_hidden_size, bias=c.projector_bias)
        self.act = VISION_ACTIVATIONS[c.projector_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionWeights(nn.Module):
    """A multimodal checkpoint's vision tower and projector as loraplex holds them,
    loaded from any of the checkpoint layouts (vision_tower.vision_model.*,
    model.vision_tower.vision_model.*, vision_tower.*: see the module's docstring)."""

    label = "vision tower / projector"  # for errors
    unused: tuple[str, ...] = ()  # our names (prefixes) of checkpoint tensors never used

    def __init__(self) -> None:
        super().__init__()
        self._loaded: set[str] = set()
        self._params: dict[str, torch.Tensor] | None = None  # by name, for load_weight

    def ours(self, name: str) -> str | None:
        """A checkpoint tensor's name in this module (any of the three layouts); None for
        one this module does not hold."""
        name = name.removeprefix("model.")
        if name.startswith("vision_tower.vision_model."):
            name = "vision_tower." + name[len("vision_tower.vision_model."):]
        if name.startswith(self.unused) or \
                name.endswith("position_ids"):  # (older checkpoints saved the buffer)
            return None
        return name

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """One checkpoint tensor of the tower or the projector."""
        ours = self.ours(name)
        if ours is None:
            return
        if self._params is None:  # built once: the checkpoint holds hundreds of tensors;
            # what a checkpoint holds: parameters and persistent buffers (Granite Speech's
            # batch norm statistics)
            self._params = dict(self.state_dict(keep_vars=True))
        params = self._params
        if ours not in params:
            raise ValueError(f"checkpoint tensor {name}: no such parameter in the "
                             f"{self.label}")
        if params[ours].shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the {self.label} expects {tuple(params[ours].shape)}")
        with torch.no_grad():
            params[ours].copy_(tensor)
        self._loaded.add(ours)

    def check_loaded(self, path: str) -> None:
        missing = [n for n, _ in self.named_parameters() if n not in self._loaded]
        if missing:
            raise ValueError(f"checkpoint in {path} lacks vision weights: "
                             + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))


class LlavaVision(VisionWeights):
    """Pixels -> one language-model input embedding per placeholder token."""

    label = "LLaVA's vision tower / projector"
    # CLIP's, on the pooled CLS (SigLIP's post_layernorm and pooling head, never read)
    unused = ("vision_tower.post_layernorm.", "vision_tower.head.")

    def __init__(self, c: LlavaVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.vision_tower = CLIPVisionTower(c, c.siglip, post_norm=False)
        self.multi_modal_projector = LlavaProjector(c)
        # LLaVA-NeXT's vector after each row of the grid's patches
        self.image_newline = (nn.Parameter(torch.empty(c.text_hidden_size))
                              if c.grid_pinpoints is not None else None)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
        """[tiles, channels, H, W] (LLaVA-1.5: one an image) of images of `sizes` (height,
        width) -> [their placeholders, text hidden], image after image."""
        c = self.config
        features = self.project(pixels)
        if self.image_newline is None:
            return features.flatten(0, 1)
        tiles = features.split([c.tiles(s) for s in sizes])
        return torch.cat([anyres_layout(c, t, s, self.image_newline)
                          for t, s in zip(tiles, sizes, strict=True)])

    def project(self, pixels: torch.Tensor) -> torch.Tensor:
        """[tiles, channels, H, W] -> [tiles, tokens a tile, text hidden]: the tower's
        feature layers (less CLIP's CLS under "default") through the projector."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        states = self.vision_tower(pixels.to(dtype))
        if not self.config.keep_cls:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

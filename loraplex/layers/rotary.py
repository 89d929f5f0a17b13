"""Rotary position embedding (Su et al., 2021), neox layout as in HF Llama/Qwen.

The cos/sin table is built once up to max_position and indexed by each token's position.
With partial rotary (Phi-4-mini: partial_rotary_factor 0.75) only each head's first
`rotary_dim` dimensions are rotated; the rest pass through. Gemma 4's "proportional"
rope rotates the whole head, its last frequencies 0 (_proportional_inv_freq).
Llama-3 rope scaling rescales the inverse frequencies by wavelength band; YaRN (Qwen3's
long context, gpt-oss) blends interpolated and original frequencies along a ramp between
two wavelengths and scales cos/sin by an attention factor. LongRoPE (Phi-3
128k, Phi-3.5) has two sets of frequencies, for sequences within the pretraining window
and beyond it: the table holds both, the long ones from row `long_offset` on, and the
model runner picks each token's row (`rope_row`). Long-context LoRA (LongLoRA, vLLM's
--long-lora-scaling-factors) works the same way: a block of rows per scaling factor f,
linear scaling (the frequencies / f) as the adapter was trained with, from row
`lora_offsets[f]` on; a token under such an adapter reads its position's row there.
M-RoPE (Qwen2-VL, models/mrope.py): positions [3, T] (temporal, height, width), frequency
i rotated by the axis whose `mrope_section` piece holds it (Qwen3-VL: the axes
interleaved, `mrope_interleaved`; models/mrope.py's frequency_axes); 1-D positions [T] are the
same on every axis, so they take the plain path (text, decode) with the same result.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.models.mrope import frequency_axes

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn", "proportional")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _proportional_inv_freq(scaling: dict, head_dim: int, theta: float) -> torch.Tensor:
    """Gemma 4's full-attention rope, as HF computes it: the first partial_rotary_factor
    of the head's frequency pairs at theta^(-2i / head_dim) (the whole head's exponents),
    the others 0 (cos 1, sin 0: those dimensions pass through), all / factor."""
    angles = int(scaling.get("partial_rotary_factor", 1.0) * head_dim // 2)
    turning = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float()
                               / head_dim))
    inv_freq = torch.cat([turning, torch.zeros(head_dim // 2 - angles)])
    return inv_freq / scaling.get("factor", 1.0)


def _yarn_inv_freq(inv_freq: torch.Tensor, scaling: dict, rotary_dim: int, theta: float,
                   max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023), as HF computes it: frequencies that turn fewer than
    beta_slow times over the original window are interpolated (/ factor), those that turn
    more than beta_fast times kept, a linear ramp between; cos and sin are scaled by
    0.1 ln(factor) + 1 (or mscale's ratio, or the given attention_factor)."""
    original = scaling.get("original_max_position_embeddings") or max_position
    factor = scaling.get("factor") or max_position / original

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(m) / mscale(m_all) if m and m_all else mscale()

    def correction_dim(rotations: float) -> float:  # the dimension turning that often
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_position: int, theta: float,
                 scaling: dict | None = None, lora_factors: tuple[float, ...] = (),
                 interleaved: bool = False,
                 mrope_section: tuple[int, ...] | None = None,
                 mrope_interleaved: bool = False,
                 rows: int | None = None) -> None:
        """`rows`: the positions the table holds when fewer than max_position are served
        (the engine's max_model_len: Llama 4 Scout's max_position is 10M); max_position
        still sets what scalings derive from it."""
        super().__init__()
        # interleaved (GPT-J / GLM style): dimensions (2i, 2i+1) rotate together, not
        # (i, i + rotary_dim / 2); the frequencies are the same
        self.rotate = _rotate_interleaved if interleaved else _rotate
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: "
                             + ", ".join(SUPPORTED_ROPE_TYPES))
        if lora_factors and rope_type != "default":
            raise ValueError(f"--long-lora-scaling-factors: long-context LoRA scales a base "
                             f"without rope scaling linearly; this model's rope is "
                             f"{rope_type!r}")
        # fp32 throughout, as the HF reference computes it, so greedy ties break the same way
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                                    / rotary_dim))
        # long-context LoRA serves max_position x its largest factor
        positions = max_position if rows is None or lora_factors else min(rows, max_position)
        t = torch.arange(int(positions * max(lora_factors, default=1.0)),
                         dtype=torch.float32)
        self.long_offset: int | None = None  # longrope: the long frequencies' first row
        self.long_threshold = 0  # longrope: the pretraining window
        scale = 1.0
        if rope_type == "longrope":
            original = scaling["original_max_position_embeddings"]
            factor = scaling.get("factor") or max_position / original
            for kind in ("short", "long"):
                if len(scaling[f"{kind}_factor"]) != len(inv_freq):
                    raise ValueError(f"longrope {kind}_factor has {len(scaling[kind + '_factor'])}"
                                     f" entries; the rotary dimension {rotary_dim} needs "
                                     f"{len(inv_freq)}")
            scale = scaling.get("attention_factor") or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
            freqs = torch.cat([torch.outer(t, inv_freq / torch.tensor(scaling[f"{kind}_factor"],
                                                                      dtype=torch.float32))
                               for kind in ("short", "long")])
            self.long_offset, self.long_threshold = positions, original
        else:
            if rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif rope_type == "yarn":
                inv_freq, scale = _yarn_inv_freq(inv_freq, scaling, rotary_dim, theta,
                                                 max_position)
            elif rope_type == "linear":
                inv_freq = inv_freq / scaling["factor"]
            elif rope_type == "proportional":
                inv_freq = _proportional_inv_freq(scaling, rotary_dim, theta)
            freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        # long-context LoRA: factor -> its block's first row (1.0: the base's own rows)
        self.lora_offsets = {1.0: 0}
        for f in sorted(set(lora_factors) - {1.0}):
            self.lora_offsets[f] = len(freqs)
            freqs = torch.cat([freqs, torch.outer(t, inv_freq / f)])
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)
        axis = None  # M-RoPE: each frequency's axis (0: temporal, 1: height, 2: width)
        if mrope_section is not None:
            if sum(mrope_section) != rotary_dim // 2:
                raise ValueError(f"mrope_section {list(mrope_section)} must sum to "
                                 f"{rotary_dim // 2} (half the rotary dimension)")
            axis = frequency_axes(mrope_section, mrope_interleaved)
        self.register_buffer("mrope_axis", axis, persistent=False)

    def rope_row(self, position: int, seq_len: int) -> int:
        """The table row of a token at `position` in a sequence of `seq_len` tokens so far
        (its prompt's, or up to this token): LongRoPE's long frequencies once the sequence
        is longer than the pretraining window, as HF's per-forward choice gives them."""
        if self.long_offset is not None and seq_len > self.long_threshold:
            return position + self.long_offset
        return position

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] (or M-RoPE's [3, T]), q: [T, H, D], k: [T, KVH, D]
        if positions.dim() == 2:  # frequency i at its axis' position: [T, rotary_dim / 2]
            rows = positions[self.mrope_axis].T
            cols = torch.arange(rows.shape[1], device=rows.device)
            cos, sin = self.cos[rows, cols].unsqueeze(1), self.sin[rows, cols].unsqueeze(1)
        else:
            cos = self.cos[positions].unsqueeze(1)  # [T, 1, rotary_dim / 2]
            sin = self.sin[positions].unsqueeze(1)
        rotate = self.rotate
        if self.rotary_dim == q.shape[-1]:
            return rotate(q, cos, sin), rotate(k, cos, sin)
        r = self.rotary_dim  # partial: the first r dimensions of each head
        return (torch.cat([rotate(q[..., :r], cos, sin), q[..., r:]], dim=-1),
                torch.cat([rotate(k[..., :r], cos, sin), k[..., r:]], dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> torch.Tensor:
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return out.to(x.dtype)

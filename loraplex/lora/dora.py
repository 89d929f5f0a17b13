"""DoRA (weight-decomposed LoRA, arXiv 2402.09353): a trained length for each output row.

    W' = m * (W + s B A) / ||W + s B A||_row        m: lora_magnitude_vector [out]

so, with g = m / ||W + s B A||_row (one number per output row),

    W' x + b = g * (W x + s B A x) + b

which is the LoRA output scaled row by row, the bias left alone (PEFT's DoraLinearLayer).
The norm depends only on the weights, so it is computed once, when the adapter is read
(`magnitude_scale`), and serving a DoRA adapter costs one multiply by its slot's g after
the LoRA op (`rescale`). Batches without a DoRA adapter pay nothing.
"""

from __future__ import annotations

import torch

_ROWS_PER_CHUNK_ELEMS = 1 << 24  # W + sBA is formed a block of rows at a time (64 MiB fp32)


@torch.no_grad()
def magnitude_scale(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    magnitude: torch.Tensor) -> torch.Tensor:
    """g = m / ||W + B A|| per output row, fp32 on the host. weight [out, in] (the base's,
    dequantized), lora_a [r, in], lora_b [out, r] with the scaling s folded in, magnitude
    [out]. Computed on the weight's device, in fp32, a block of rows at a time."""
    a = lora_a.to(weight.device, torch.float32)
    b = lora_b.to(weight.device, torch.float32)
    rows = max(1, _ROWS_PER_CHUNK_ELEMS // weight.shape[1])
    norms = torch.cat([
        torch.linalg.vector_norm(weight[i:i + rows].float() + b[i:i + rows] @ a, dim=1)
        for i in range(0, weight.shape[0], rows)])
    return magnitude.float() / norms.cpu()


def rescale(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
            slots: torch.Tensor) -> torch.Tensor:
    """g[slot] * (y - b) + b for each token row of y (W x + b + the LoRA delta): rows of
    base tokens (slot -1) are left as they are. scale [S, out] fp32 (1 where a slot has
    no DoRA adapter), slots [T] (the tokens' adapter slots)."""
    g = scale[slots.clamp(min=0).long()]
    g = torch.where((slots >= 0).unsqueeze(1), g, 1.0)
    if bias is None:
        return (y.float() * g).to(y.dtype)
    return ((y - bias).float() * g + bias).to(y.dtype)

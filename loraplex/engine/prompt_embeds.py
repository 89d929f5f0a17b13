"""vLLM's prompt embeddings: a prompt given as its rows' embeddings [length, hidden]
instead of token ids (`{"prompt_embeds": tensor}` offline, base64 `torch.save` bytes in
`/v1/completions`' `prompt_embeds`), with `enable_prompt_embeds` on.

They ride the image path (engine/images.py `ImageInputs`): every prompt row is a
placeholder whose embedding is given, so the model runner puts them in place of the
token embeddings (a LoRA on `embed_tokens` does not see them, as in vLLM), and the
tensor's hash keys the prompt's prefix-cache blocks (only the very same embeddings share
K/V). The prompt's token ids are placeholders, which neither the sampler's penalties nor
the detokenizer read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io

import torch

from loraplex.engine.images import ImageInputs

PLACEHOLDER_ID = 0  # the token id of an embedded row (never embedded, never penalized)
NOT_ENABLED = ("prompt_embeds: you must set enable_prompt_embeds=True "
               "(--enable-prompt-embeds) to input prompt_embeds")


def decode_prompt_embeds(data: str) -> torch.Tensor:
    """The tensor a client sent: base64 of `torch.save` bytes, read with weights_only
    (no code runs); ValueError for anything else."""
    try:
        raw = base64.b64decode(data, validate=True)
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except (binascii.Error, ValueError, RuntimeError, EOFError, TypeError) as e:
        raise ValueError("prompt_embeds: not a base64-encoded torch.save of a tensor "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds: the saved object is a {type(tensor).__name__}, "
                         "not a tensor")
    return tensor


def checked_prompt_embeds(tensor: object, hidden_size: int) -> torch.Tensor:
    """[length, hidden] floating-point, dense and finite ([1, length, hidden] taken as
    one prompt, as vLLM does); ValueError naming what is wrong."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_sparse:
        tensor = tensor.to_dense()
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2 or tensor.shape[-1] != hidden_size:
        raise ValueError(f"prompt_embeds must have shape [length, {hidden_size}] (the "
                         f"model's hidden size), got {list(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("prompt_embeds is empty")
    if not tensor.is_floating_point():
        raise ValueError(f"prompt_embeds must be floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError("prompt_embeds has non-finite values")
    return tensor


def prompt_embeds_inputs(tensor: torch.Tensor, device: torch.device,
                         dtype: torch.dtype) -> ImageInputs:
    """The embedded rows as the image path takes them: all of the prompt, its embeddings
    given (on the model's device, in its dtype), hashed for the prefix cache."""
    n = tensor.shape[0]
    embeds = tensor.detach().to(device=device, dtype=dtype).contiguous()
    digest = hashlib.blake2b(embeds.float().cpu().numpy().tobytes(), digest_size=16).digest()
    return ImageInputs(pixel_values=torch.empty(0), positions=list(range(n)),
                       ranges=[(0, n)], hashes=[digest], embeds=embeds,
                       prompt_embeds=True)

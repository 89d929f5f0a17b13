"""`AudioAsset`: vLLM's example audio clips ("mary_had_lamb", "winning_call"), Ogg files
in vLLM's public S3 bucket, downloaded once into $LORAPLEX_ASSETS_CACHE (default
~/.cache/loraplex/assets)/multimodal_asset/ and decoded with PyAV (the `loraplex[video]`
extra) at their own rate, mono, as vLLM's `librosa.load(path, sr=None)` gives them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from loraplex import envs
from loraplex.engine.audio_decode import decode_audio

VLLM_S3_BUCKET_URL = "https://vllm-public-assets.s3.us-west-2.amazonaws.com"
ASSET_DIR = "multimodal_asset"
AudioAssetName = Literal["winning_call", "mary_had_lamb"]


def assets_cache() -> Path:
    """Where assets are kept: $LORAPLEX_ASSETS_CACHE, else ~/.cache/loraplex/assets."""
    return Path(envs.LORAPLEX_ASSETS_CACHE or
                os.path.join(os.path.expanduser("~"), ".cache", "loraplex", "assets"))


def public_asset(filename: str, prefix: str = ASSET_DIR, timeout: float = 60.0) -> Path:
    """The cached copy of vLLM's public asset `prefix/filename`, fetched when absent."""
    path = assets_cache() / prefix / filename
    if path.is_file():
        return path
    import httpx

    url = f"{VLLM_S3_BUCKET_URL}/{prefix}/{filename}"
    try:
        resp = httpx.get(url, timeout=timeout, follow_redirects=True)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"cannot download the asset {url}: {e} (or put the file at "
                         f"{path}; LORAPLEX_ASSETS_CACHE moves the cache)") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.part")
    tmp.write_bytes(resp.content)
    tmp.replace(path)  # whole or not at all, for a concurrent reader
    return path


@dataclass(frozen=True)
class AudioAsset:
    name: AudioAssetName

    @property
    def filename(self) -> str:
        return f"{self.name}.ogg"

    @property
    def audio_and_sample_rate(self) -> tuple[np.ndarray, int]:
        """(mono float32 waveform, its sample rate)."""
        return decode_audio(self.get_local_path().read_bytes())

    def get_local_path(self) -> Path:
        return public_asset(self.filename)

    @property
    def url(self) -> str:
        return f"{VLLM_S3_BUCKET_URL}/{ASSET_DIR}/{self.filename}"

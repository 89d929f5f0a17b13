"""Chat messages' content parts, as vLLM reads them: text parts, image parts
(OpenAI's `image_url`, with a data:, http(s) or file:// URL, file:// only under
--allowed-local-media-path: engine/media.py; vLLM's `image_pil` offline), and on
Qwen2-VL / Qwen2.5-VL vLLM's `video_url` parts (engine/video_decode.py: animated GIF /
WebP / PNG by PIL, video files by PyAV, the `loraplex[video]` extra; frames sampled by
media_io_kwargs), and on Granite Speech, Qwen2-Audio and Voxtral audio parts (OpenAI's
`input_audio`, base64 data with its format; vLLM's `audio_url`, data: / http(s) / file://
like an image's: WAV decoded by the standard library, other formats by PyAV,
engine/audio_decode.py), for LLM.chat and
the chat route alike.

A message's text parts are joined into one string, as before. A message with images is
given to the chat template as parts ({"type": "image"} where each image was) when the
template reads parts (it names "image": LLaVA's templates do), else as one string with
the model's image placeholder and a newline where each image was (vLLM's "string"
content format puts them first); the images themselves go with the request, in order.
Videos the same ({"type": "video"}; the video placeholder), in their own list; audio
clips too ({"type": "audio"}; `<|audio|>`). Under tokenizer_mode "mistral" (no template)
Voxtral's clips and Pixtral's images go to mistral_common as parts, which it expands.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from typing import Any

from loraplex.config import MultiModalConfig
from loraplex.engine.audio_decode import decode_audio, load_audio
from loraplex.engine.images import load_image
from loraplex.engine.media import MediaConnector
from loraplex.engine.video_decode import VideoSampling, load_video


@dataclass
class ChatImages:
    """What image parts mean for the model served."""

    model: str
    placeholder: str | None  # the image token's text; None: the model takes no images
    template: str | None  # the chat template in use, to tell its content format
    images: list[Any] = field(default_factory=list)  # the conversation's, in order
    # limit_mm_per_prompt: checked before each image is fetched or decoded
    multimodal: MultiModalConfig = field(default_factory=MultiModalConfig)
    # the video token's text; None: the model takes no videos
    video_placeholder: str | None = None
    videos: list[Any] = field(default_factory=list)  # (frames, metadata), in order
    # the audio token's text; None: the model takes no audio
    audio_placeholder: str | None = None
    audios: list[Any] = field(default_factory=list)  # (waveform, sample rate), in order
    # Voxtral under tokenizer_mode "mistral": mistral_common encodes the audio parts
    # itself, so they stay parts (`input_audio`, each clip resampled to this rate first:
    # engine/voxtral_inputs.py); None: parts or placeholders as the template reads them
    mistral_audio_rate: int | None = None
    # a Pixtral model under tokenizer_mode "mistral": mistral_common expands the image parts
    # itself (its own image encoding, engine/mistral_images.py), so they stay parts
    # (`image_url`, the decoded image as a PNG data URL)
    mistral_images: bool = False
    # how URLs are read and video files sampled: from `multimodal`
    connector: MediaConnector = field(init=False)
    sampling: VideoSampling = field(init=False)

    @classmethod
    def for_engine(cls, engine: Any, template: str | None, tokenizer: Any) -> ChatImages:
        """What the served engine's model takes, for a chat rendered with `template` by
        `tokenizer` (LLM.chat's and the chat route's alike)."""
        return cls(engine.model_config.name, engine.image_placeholder, template,
                   multimodal=engine.multimodal, video_placeholder=engine.video_placeholder,
                   audio_placeholder=engine.audio_placeholder,
                   mistral_audio_rate=engine.mistral_audio_rate,
                   mistral_images=getattr(tokenizer, "is_mistral", False))

    def __post_init__(self) -> None:
        mm = self.multimodal
        self.connector = MediaConnector(mm.allowed_local_media_path)
        self.sampling = VideoSampling(mm.video_num_frames, mm.video_fps)

    def __bool__(self) -> bool:
        """Whether the conversation carries images, videos or audio."""
        return bool(self.images or self.videos or self.audios)

    def multi_modal_data(self) -> dict[str, Any]:
        """The prompt's multi_modal_data (empty without images and videos)."""
        data: dict[str, Any] = {}
        if self.images:
            data["image"] = self.images
        if self.videos:
            data["video"] = self.videos
        if self.audios:
            data["audio"] = self.audios
        return data

    def content(self, content: Any, i: int) -> Any:
        """Message i's content for the template; its images appended to `images`."""
        if not isinstance(content, list):
            return content
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "image_pil"):
                self._one_more("image", self.images, i)
                parts.append({"type": "image"})
                self.images.append(self._image(part, kind, i))
            elif kind == "video_url":
                self._one_more("video", self.videos, i)
                parts.append({"type": "video"})
                self.videos.append(self._video(part, i))
            elif kind in ("input_audio", "audio_url"):
                self._one_more("audio", self.audios, i)
                parts.append({"type": "audio"})
                self.audios.append(self._audio(part, kind, i))
            else:
                raise ValueError(f"messages[{i}]: content part of type {kind!r} is not "
                                 "supported yet (text, image_url, video_url, input_audio, "
                                 "audio_url)")
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        if self.mistral_audio_rate is not None or (self.mistral_images and self.images):
            return self._mistral_parts(parts)
        if self.template is not None and re.search(r"""['"](image|video|audio)['"]""",
                                                   self.template):
            return parts
        marks = {"image": self.placeholder, "video": self.video_placeholder,
                 "audio": self.audio_placeholder}
        # each item's 1-based number among the conversation's items of its modality, for
        # a placeholder that writes it (vLLM's placeholder strings take it: Qwen2-Audio's
        # "Audio {i}: ...")
        numbers = {kind: len(items) - sum(p["type"] == kind for p in parts)
                   for kind, items in (("image", self.images), ("video", self.videos),
                                       ("audio", self.audios))}
        out = []
        for p in parts:
            if p["type"] == "text":
                out.append(p["text"])
                continue
            numbers[p["type"]] += 1
            out.append(marks[p["type"]].replace("{i}", str(numbers[p["type"]])) + "\n")
        return "".join(out)

    def _mistral_parts(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The message's parts for mistral_common: its clips (the last of `audios`) as
        `input_audio` WAVs at the model's rate, the resampled clips kept instead; its
        images (the last of `images`) as `image_url` PNG data URLs."""
        first = {kind: len(items) - sum(p["type"] == kind for p in parts)
                 for kind, items in (("audio", self.audios), ("image", self.images))}
        out = []
        for p in parts:
            if p["type"] == "audio" and self.mistral_audio_rate is not None:
                from loraplex.engine.voxtral_inputs import input_audio_part

                k = first["audio"]
                p, self.audios[k] = input_audio_part(self.audios[k], self.mistral_audio_rate)
                first["audio"] += 1
            elif p["type"] == "image" and self.mistral_images:
                p = {"type": "image_url", "image_url": {"url": png_data_url(
                    self.images[first["image"]])}}
                first["image"] += 1
            out.append(p)
        return out

    def _one_more(self, modality: str, items: list[Any], i: int) -> None:
        """limit_mm_per_prompt allows message i's next item of `modality`; checked before
        the item is fetched or decoded."""
        try:
            self.multimodal.check_count(modality, len(items) + 1)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from None

    def _video(self, part: dict[str, Any], i: int) -> Any:
        if self.video_placeholder is None:
            raise ValueError(f"messages[{i}]: video_url: video inputs are not supported by model "
                             f"{self.model!r} (videos are served on Qwen2-VL, Qwen2.5-VL, "
                             "Qwen3-VL, Qwen3.5 and Gemma 4)")
        value = part.get("video_url")
        if isinstance(value, dict):
            value = value.get("url")
        try:
            return load_video(value, self.connector, self.sampling)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from e

    def _image(self, part: dict[str, Any], kind: str, i: int) -> Any:
        if self.placeholder is None:
            raise ValueError(f"messages[{i}]: image inputs are not supported by model "
                             f"{self.model!r}: it has no vision tower (image inputs are served "
                             "on LLaVA, Gemma 3, Llama 4, Qwen-VL, Mistral 3 and Phi-4-multimodal "
                             "models)")
        value = part.get(kind)
        if kind == "image_url" and isinstance(value, dict):
            value = value.get("url")
        try:
            return load_image(value, self.connector)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from e

    def _audio(self, part: dict[str, Any], kind: str, i: int) -> Any:
        if self.audio_placeholder is None:
            raise ValueError(f"messages[{i}]: {kind}: audio inputs are not supported by model "
                             f"{self.model!r} (audio is served on Granite Speech, Qwen2-Audio, "
                             "Phi-4-multimodal and Voxtral)")
        value = part.get(kind)
        try:
            if kind == "audio_url":
                url = value.get("url") if isinstance(value, dict) else value
                if not isinstance(url, str):
                    raise ValueError("an audio_url part needs {\"url\": ...}")
                return load_audio(url, self.connector)
            data = value.get("data") if isinstance(value, dict) else None
            if not isinstance(data, str):
                raise ValueError("an input_audio part needs {\"data\": <base64>, "
                                 "\"format\": ...}")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"input_audio data is not valid base64: {e}") from e
            return decode_audio(raw)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from e


def png_data_url(image: Any) -> str:
    """A decoded image as a lossless PNG data URL (mistral_common decodes it back to the
    same pixels; a mode PNG has not, such as CMYK, as RGBA: mistral_common's own first
    step)."""
    buf = io.BytesIO()
    (image if image.mode in ("RGB", "RGBA") else image.convert("RGBA")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

"""Chat messages' content parts, as vLLM reads them: text parts, and image parts
(OpenAI's `image_url`, with a data: or http(s) URL; vLLM's `image_pil` offline), for
LLM.chat and the chat route alike.

A message's text parts are joined into one string, as before. A message with images is
given to the chat template as parts ({"type": "image"} where each image was) when the
template reads parts (it names "image": LLaVA's templates do), else as one string with
the model's image placeholder and a newline where each image was (vLLM's "string"
content format puts them first); the images themselves go with the request, in order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from loraplex.config import MultiModalConfig
from loraplex.engine.images import load_image


@dataclass
class ChatImages:
    """What image parts mean for the model served."""

    model: str
    placeholder: str | None  # the image token's text; None: the model takes no images
    template: str | None  # the chat template in use, to tell its content format
    images: list[Any] = field(default_factory=list)  # the conversation's, in order
    # limit_mm_per_prompt: checked before each image is fetched or decoded
    multimodal: MultiModalConfig = field(default_factory=MultiModalConfig)

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
                try:
                    self.multimodal.check_count("image", len(self.images) + 1)
                except ValueError as e:
                    raise ValueError(f"messages[{i}]: {e}") from None
                parts.append({"type": "image"})
                self.images.append(self._image(part, kind, i))
            else:
                raise ValueError(f"messages[{i}]: content part of type {kind!r} is not "
                                 "supported yet (text, image_url)")
        if all(p["type"] == "text" for p in parts):
            return "".join(p["text"] for p in parts)
        if self.template is not None and re.search(r"""['"]image['"]""", self.template):
            return parts
        return "".join(p["text"] if p["type"] == "text" else f"{self.placeholder}\n"
                       for p in parts)

    def _image(self, part: dict[str, Any], kind: str, i: int) -> Any:
        if self.placeholder is None:
            raise ValueError(f"messages[{i}]: image inputs are not supported by model "
                             f"{self.model!r}: it has no vision tower (image inputs are served "
                             "on LLaVA, Gemma 3, Llama 4, Qwen-VL and Mistral 3 models)")
        value = part.get(kind)
        if kind == "image_url" and isinstance(value, dict):
            value = value.get("url")
        try:
            return load_image(value)
        except ValueError as e:
            raise ValueError(f"messages[{i}]: {e}") from e

"""Where a media URL's bytes come from, as vLLM's MediaConnector reads one: a data: URL
(base64), an http(s) URL (fetched with a timeout), or a file:// URL of a file under
--allowed-local-media-path (vLLM's rule and wording: refused without the flag; the
file's path resolved, symlinks and `..` followed, must lie below that directory).

Chat messages (LLM.chat, the chat route) read URLs through a MediaConnector built from
the engine's MultiModalConfig; a URL in offline multi_modal_data has none, so a file://
URL there is refused (give the image itself).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MediaConnector:
    """How one engine reads media URLs: which local directory file:// URLs may name."""

    allowed_local_media_path: str | None = None  # resolved (config.py: _media_dir)
    fetch_timeout: float = FETCH_TIMEOUT_S

    def fetch(self, url: str, what: str) -> tuple[bytes, str]:
        """The URL's bytes and its media type ("" where the URL does not say); `what`
        ("image", "video") names the media in errors. ValueError for a URL not read."""
        if url.startswith("data:"):
            return _data_url(url, what)
        if url.startswith(("http://", "https://")):
            return _http(url, what, self.fetch_timeout)
        if url.startswith("file:"):
            return self._file(url, what), ""
        raise ValueError(f"{_a(what)} URL must be a data: URL or an http(s) URL (or a "
                         f"file:// URL under --allowed-local-media-path), got {url[:40]!r}")

    def _file(self, url: str, what: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise ValueError("Cannot load local files without `--allowed-local-media-path`.")
        spec = urlparse(url)
        path = Path(url2pathname(spec.netloc + spec.path))
        allowed = Path(self.allowed_local_media_path)
        if allowed not in path.resolve().parents:
            raise ValueError(f"The file path {path} must be a subpath of "
                             f"`--allowed-local-media-path {allowed}`.")
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the {what} file {path}: {e.strerror}") from e


def fetch_media(url: str, what: str, connector: MediaConnector | None) -> tuple[bytes, str]:
    """MediaConnector.fetch, or without one (offline multi_modal_data) every URL but a
    file:// one."""
    if connector is None:
        if url.startswith("file:"):
            raise ValueError(f"a file:// {what} URL is read in chat messages only (LLM.chat, "
                             "the chat route, under --allowed-local-media-path); give "
                             f"multi_modal_data the {what} itself")
        connector = MediaConnector()
    return connector.fetch(url, what)


def _data_url(url: str, what: str) -> tuple[bytes, str]:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError(f"{_a(what)} data URL must be data:<mime>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True), header[5:-7].lower()
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"the {what} data URL is not valid base64: {e}") from e


def _http(url: str, what: str, timeout: float) -> tuple[bytes, str]:
    import httpx

    try:
        resp = httpx.get(url, timeout=timeout, follow_redirects=True)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ValueError(f"cannot fetch the {what} at {url}: {e}") from e
    return resp.content, resp.headers.get("content-type", "").split(";")[0].strip().lower()


def _a(what: str) -> str:
    return f"an {what}" if what[0] in "aeiou" else f"a {what}"

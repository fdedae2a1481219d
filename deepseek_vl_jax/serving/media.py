"""Images of a chat request: `data:` base64 URLs, `file://` paths under the allowed directory, http(s) URLs fetched
with a size and time limit. Every failure is an `ApiError` (400) naming the image and what to do."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import urllib.parse

from PIL import Image, ImageOps

from deepseek_vl_jax.serving.protocol import ApiError


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    max_images: int = 8  # per request
    max_image_bytes: int = 20 << 20  # encoded size of one image
    allowed_media_dir: str | None = None  # file:// URLs only below this directory (none when unset)
    fetch_timeout: float = 10.0  # seconds, http(s) images


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param, "invalid_image")


def _read_data_url(url: str, limits: MediaLimits, param: str) -> bytes:
    header, sep, data = url.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise _bad(f"{param}: a data URL must look like data:image/<type>;base64,<data>", param)
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise _bad(f"{param}: the image is over the {limits.max_image_bytes} byte limit", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{param}: the base64 image data is malformed", param) from None


def _read_file_url(url: str, limits: MediaLimits, param: str) -> bytes:
    if limits.allowed_media_dir is None:
        raise _bad(f"{param}: file:// images are disabled (start the server with --allowed-media-dir)", param)
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    root = os.path.realpath(limits.allowed_media_dir)
    real = os.path.realpath(path)
    if ".." in path.split("/") or os.path.commonpath([root, real]) != root:
        raise _bad(f"{param}: {path!r:.200} is outside the allowed media directory", param)
    if not os.path.isfile(real):
        raise _bad(f"{param}: no such file {path!r:.200}", param)
    if os.path.getsize(real) > limits.max_image_bytes:
        raise _bad(f"{param}: the image is over the {limits.max_image_bytes} byte limit", param)
    with open(real, "rb") as f:
        return f.read()


def _fetch(url: str, limits: MediaLimits, param: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.fetch_timeout, follow_redirects=True) as r:
            if r.status_code != 200:
                raise _bad(f"{param}: fetching the image gave HTTP {r.status_code}", param)
            data = bytearray()
            for part in r.iter_bytes():
                data += part
                if len(data) > limits.max_image_bytes:
                    raise _bad(f"{param}: the image is over the {limits.max_image_bytes} byte limit", param)
            return bytes(data)
    except httpx.HTTPError as e:
        raise _bad(f"{param}: cannot fetch the image: {type(e).__name__}", param) from None


def load_image(url: str, limits: MediaLimits, param: str) -> Image.Image:
    """An image URL -> RGB PIL image (raises ApiError)."""
    if url.startswith("data:"):
        data = _read_data_url(url, limits, param)
    elif url.startswith("file://"):
        data = _read_file_url(url, limits, param)
    elif url.startswith(("http://", "https://")):
        data = _fetch(url, limits, param)
    else:
        raise _bad(f"{param}: the image URL must be a data:, file:// or http(s):// URL", param)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as e:  # PIL raises many types on corrupt data
        raise _bad(f"{param}: the image does not decode ({type(e).__name__})", param) from None

"""Image preprocessing identical to transformers' `DeepseekVLImageProcessorPil` / `DeepseekVLHybridImageProcessorPil`.

Pipeline for one image (all integer work is done on uint8 pixels exactly as the reference does):

1. Load and convert to RGB (`load_rgb_image`):
   * a path (``str``/``Path``) is opened with PIL, EXIF-transposed and converted with ``Image.convert("RGB")`` — the
     reference's ``load_image``; transparency is *dropped*, not composited;
   * a PIL image is converted like ``transformers.image_transforms.convert_to_rgb``: images with an alpha band
     (RGBA, LA, PA, ...) or a ``transparency`` entry (e.g. P/L with a transparent colour) become RGBA and are
     alpha-composited onto white; every other mode (L, P, I;16, I, F, CMYK, 1, YCbCr, ...) uses PIL's own
     ``convert("RGB")``;
   * a uint8 numpy array is read channels-first if its first axis has 1, 3 or 4 entries, else channels-last (the
     reference's ``infer_channel_dimension_format`` rule); one channel is repeated, four channels are composited on
     white with ``round(a/255 * rgb + (1 - a/255) * 255)``.
2. Resize so the longest side becomes ``size`` (``round`` each side, floor ``min_size``) with PIL bicubic;
   ``resize_rounding="floor"``: ``int(side / longest * size)`` instead, as the original deepseek-ai
   ``VLMImageProcessor`` does (a 150x401 picture is 143 px wide at 384 there, 144 in transformers).
3. Pad to a square, centred, with background ``int(mean * 255)`` per channel.
4. Rescale by ``rescale_factor`` (float64, then float32) and normalise in float32 — done with a per-channel
   256-entry lookup table that holds exactly the values the reference computes, so results are bit-identical.

Steps 1-3 use PIL (padding by pasting on a background canvas), step 4 writes straight into the batch output; images of
a batch are processed in parallel threads.

The hybrid processor resizes+pads to ``high_res_size`` first, then resizes+pads *that padded image* to ``size``; each
resolution is normalised with its own mean/std. With ``low_res_resize="antialiased_bilinear"`` the low-res image is
instead the original DeepSeek-VL-Hybrid's: the rescaled high-res float image resized by torch's antialiased bilinear
filter (`resize.resize_antialiased`), then normalised with the low-res mean/std.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageLoadError, ProcessorConfigError
from .resize import resize_antialiased

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3
ROUND, FLOOR = "round", "floor"  # resize_rounding: transformers', the original deepseek-ai processor's
LOW_RES_PIL, LOW_RES_ANTIALIASED = "pil", "antialiased_bilinear"  # low_res_resize: transformers', the original's


def _square_size(value: Any, name: str) -> int:
    """Parse a transformers size setting into one int; DeepSeek-VL only supports square targets."""
    if value is None:
        raise ProcessorConfigError(f"image processor setting {name!r} is missing")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if isinstance(value, dict):
        h, w = value.get("height"), value.get("width")
        if h is not None and h == w:
            return int(h)
    raise ProcessorConfigError(f"image processor setting {name!r} must be a square height/width, got {value!r}")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the DeepSeek-VL image processor (names follow transformers' preprocessor config)."""

    size: int = 384
    min_size: int = 14
    resample: int = BICUBIC
    do_resize: bool = True
    do_pad: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | None = OPENAI_CLIP_STD
    # Hybrid (DeepSeek-VL 7B: SigLIP 384 px + SAM 1024 px) settings; `high_res_size=None` means not hybrid.
    high_res_size: int | None = None
    high_res_resample: int = BICUBIC
    high_res_image_mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    high_res_image_std: tuple[float, ...] | None = OPENAI_CLIP_STD
    resize_rounding: str = ROUND
    low_res_resize: str = LOW_RES_PIL
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_hybrid(self) -> bool:
        return self.high_res_size is not None

    def __post_init__(self):
        if self.resize_rounding not in (ROUND, FLOOR):
            raise ProcessorConfigError(f"image processor setting 'resize_rounding' must be {ROUND!r} or {FLOOR!r}, "
                                       f"got {self.resize_rounding!r}")
        if self.low_res_resize not in (LOW_RES_PIL, LOW_RES_ANTIALIASED):
            raise ProcessorConfigError(f"image processor setting 'low_res_resize' must be {LOW_RES_PIL!r} or "
                                       f"{LOW_RES_ANTIALIASED!r}, got {self.low_res_resize!r}")
        if self.low_res_resize == LOW_RES_ANTIALIASED and not (self.do_resize and self.do_pad and self.do_rescale):
            raise ProcessorConfigError(f"low_res_resize={LOW_RES_ANTIALIASED!r} needs do_resize, do_pad and "
                                       f"do_rescale (it resizes the square rescaled high-resolution image)")

    @classmethod
    def from_dict(cls, d: dict, hybrid: bool | None = None) -> "ImageProcessorConfig":
        """Build from a transformers image-processor dict; `hybrid=None` infers it from the keys / type name."""
        if hybrid is None:
            hybrid = "Hybrid" in str(d.get("image_processor_type", "")) or "high_res_size" in d

        def get(key, default):
            v = d.get(key)
            return default if v is None else v

        def floats(key, default):
            v = d.get(key, default)
            if v is None:
                return None
            return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

        kwargs = dict(
            size=_square_size(get("size", {"height": 384, "width": 384}), "size"),
            min_size=int(get("min_size", 14)),
            resample=int(get("resample", BICUBIC)),
            do_resize=bool(get("do_resize", True)),
            do_pad=bool(get("do_pad", True)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            image_mean=floats("image_mean", OPENAI_CLIP_MEAN),
            image_std=floats("image_std", OPENAI_CLIP_STD),
            resize_rounding=str(get("resize_rounding", ROUND)),
            extra={k: v for k, v in d.items()},
        )
        if hybrid:
            kwargs.update(
                high_res_size=_square_size(get("high_res_size", {"height": 1024, "width": 1024}), "high_res_size"),
                high_res_resample=int(get("high_res_resample", BICUBIC)),
                high_res_image_mean=floats("high_res_image_mean", OPENAI_CLIP_MEAN),
                high_res_image_std=floats("high_res_image_std", OPENAI_CLIP_STD),
                low_res_resize=str(get("low_res_resize", LOW_RES_PIL)),
            )
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A transformers-compatible image processor dict (what `processor_config.json` nests)."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        out = dict(self.extra)
        out.update(
            image_processor_type="DeepseekVLHybridImageProcessor" if self.is_hybrid else "DeepseekVLImageProcessor",
            size={"height": self.size, "width": self.size},
            min_size=self.min_size,
            resample=self.resample,
            do_resize=self.do_resize,
            do_pad=self.do_pad,
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=list(d["image_mean"]) if d["image_mean"] is not None else None,
            image_std=list(d["image_std"]) if d["image_std"] is not None else None,
        )
        if self.resize_rounding != ROUND:  # only written when set: transformers does not know these keys
            out["resize_rounding"] = self.resize_rounding
        if self.low_res_resize != LOW_RES_PIL:
            out["low_res_resize"] = self.low_res_resize
        if self.is_hybrid:
            out.update(
                high_res_size={"height": self.high_res_size, "width": self.high_res_size},
                high_res_resample=self.high_res_resample,
                high_res_image_mean=list(self.high_res_image_mean) if self.high_res_image_mean else None,
                high_res_image_std=list(self.high_res_image_std) if self.high_res_image_std else None,
            )
        return out


# ----------------------------------------------------------------------------------------------------------------
# Loading / RGB conversion
# ----------------------------------------------------------------------------------------------------------------


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PIL modes I;16*, or I holding 16-bit values) scaled to 8 bits (x / 257). PIL's
    convert("RGB") clips such values at 255, turning most pictures white; transformers does the same clipping, so
    here this library departs from it on purpose (tests/test_processing_16bit.py)."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image


def _open_path(path: str) -> Image.Image:
    """transformers' `load_image` for local files: open, EXIF-transpose, plain `convert("RGB")` (16-bit greyscale
    scaled to 8 bits first, see `_to_8_bit`)."""
    try:
        image = Image.open(path)
        image = ImageOps.exif_transpose(image)
        return _to_8_bit(image).convert("RGB")
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageLoadError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e


def load_rgb_image(image: Any) -> Image.Image:
    """Turn a user image (path, PIL image, uint8 numpy array, ``data:image/...;base64`` string) into an RGB PIL image
    with exactly the pixels the reference image processor would work on."""
    if isinstance(image, Path):
        image = str(image)
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            raise ImageLoadError(f"cannot read image {image!r}: remote URLs are not supported, pass a local path")
        if os.path.isfile(image):
            return _open_path(image)
        if image.startswith("data:image/"):
            try:
                data = base64.decodebytes(image.split(",", 1)[1].encode())
                return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
            except Exception as e:
                raise ImageLoadError(f"cannot decode base64 image data: {type(e).__name__}: {e}") from e
        raise ImageLoadError(f"cannot read image file {image!r}: no such file")
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageLoadError(
        f"unsupported image object of type {type(image).__name__}: pass a PIL image, a path or a uint8 numpy array"
    )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for PIL images (alpha composited onto white)."""
    name = getattr(image, "filename", "") or f"<PIL image mode={image.mode} size={image.size}>"
    try:
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as e:
        raise ImageLoadError(f"cannot read image {name!r}: {type(e).__name__}: {e}") from e


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb for uint8 arrays (channel axis inferred like the reference)."""
    if array.dtype != np.uint8:
        raise ImageLoadError(f"unsupported numpy image dtype {array.dtype}: expected uint8 (H, W, C)")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if array.shape[0] in (1, 3, 4):  # the reference assumes channels-first whenever the first axis fits
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 3, 4):
            raise ImageLoadError(f"unsupported numpy image shape {array.shape}: expected (H, W, 1|3|4)")
    else:
        raise ImageLoadError(f"unsupported numpy image shape {array.shape}: expected (H, W, C)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"empty numpy image of shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


# ----------------------------------------------------------------------------------------------------------------
# Geometry and normalisation
# ----------------------------------------------------------------------------------------------------------------


def resize_longest_side(image: Image.Image, target: int, min_size: int, resample: int,
                        rounding: str = ROUND) -> Image.Image:
    """Resize so the longest side is `target` (each side `round`-ed, or floored for FLOOR, at least `min_size`)."""
    width, height = image.size
    if rounding == FLOOR:  # the original: int(height / max_size * image_size)
        longest = max(height, width)
        new_height = max(int(height / longest * target), min_size)
        new_width = max(int(width / longest * target), min_size)
    else:
        delta = target / max(height, width)
        new_height = max(round(height * delta), min_size)
        new_width = max(round(width * delta), min_size)
    return image.resize((new_width, new_height), resample=resample)


def background_color(mean: Sequence[float] | None) -> tuple[int, int, int]:
    return (127, 127, 127) if mean is None else tuple(int(x * 255) for x in mean)


def normalization_lut(
    do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: Sequence[float] | None, std
) -> np.ndarray:
    """(3, 256) float32 table: value of every uint8 level after the reference's rescale and normalise steps."""
    levels = np.arange(256, dtype=np.uint8)
    values = (levels.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale else levels
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if do_normalize:
        m = np.asarray(mean if mean is not None else (0.0,) * 3, dtype=np.float32)
        s = np.asarray(std if std is not None else (1.0,) * 3, dtype=np.float32)
        values = (values - m[:, None]) / s[:, None]
    return np.ascontiguousarray(values, dtype=np.float32)


def apply_lut(array: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 via the per-channel table."""
    height, width = array.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], array[:, :, c], out=out[c])
    return out


def pad_to_square_pil(image: Image.Image, color: Sequence[int]) -> Image.Image:
    """`pad_to_square` on a PIL RGB image (same placement, done by PIL's paste: much faster than numpy)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _lut_into(image: Image.Image, lut: np.ndarray, out: np.ndarray) -> None:
    array = np.asarray(image)
    for c in range(3):
        np.take(lut[c], array[:, :, c], out=out[c])


class DeepseekVLImageProcessor:
    """Preprocess images for DeepSeek-VL (and, with `high_res_size`, DeepSeek-VL-Hybrid).

    `num_threads`: images of a batch are processed in parallel threads (PIL and numpy release the GIL);
    default: the number of CPUs (at most 8); 1 disables threading."""

    def __init__(self, config: ImageProcessorConfig | None = None, num_threads: int | None = None):
        self.config = config or ImageProcessorConfig()
        self.num_threads = max(1, num_threads if num_threads is not None else min(8, os.cpu_count() or 1))
        c = self.config
        self._lut = normalization_lut(c.do_rescale, c.rescale_factor, c.do_normalize, c.image_mean, c.image_std)
        self._bg = background_color(c.image_mean)
        if c.is_hybrid:
            self._high_lut = normalization_lut(
                c.do_rescale, c.rescale_factor, c.do_normalize, c.high_res_image_mean, c.high_res_image_std
            )
            self._high_bg = background_color(c.high_res_image_mean)
            self._rescale_lut = normalization_lut(c.do_rescale, c.rescale_factor, False, None, None)

    @property
    def is_hybrid(self) -> bool:
        return self.config.is_hybrid

    @property
    def model_input_names(self) -> tuple[str, ...]:
        return ("pixel_values", "high_res_pixel_values") if self.is_hybrid else ("pixel_values",)

    def geometry(self, image: Any) -> tuple[Image.Image, Image.Image | None]:
        """Load, convert, resize and pad one image: the final uint8 (low-res, high-res or None) PIL images."""
        c = self.config
        rgb = load_rgb_image(image)
        if not c.is_hybrid:
            if c.do_resize:
                rgb = resize_longest_side(rgb, c.size, c.min_size, c.resample, c.resize_rounding)
            if c.do_pad:
                rgb = pad_to_square_pil(rgb, self._bg)
            return rgb, None
        if not c.do_resize:  # the reference pads only inside its resize branch
            return rgb, rgb
        high = resize_longest_side(rgb, c.high_res_size, c.min_size, c.high_res_resample, c.resize_rounding)
        if c.do_pad:
            high = pad_to_square_pil(high, self._high_bg)
        if c.low_res_resize == LOW_RES_ANTIALIASED:
            return None, high  # made from the high-res floats in __call__
        low = resize_longest_side(high, c.size, c.min_size, c.resample, c.resize_rounding)
        if c.do_pad:
            low = pad_to_square_pil(low, self._bg)
        return low, high

    def _map(self, fn, items: list) -> list:
        if self.num_threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(self.num_threads, len(items))) as pool:
            return list(pool.map(fn, items))

    def __call__(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Process a flat list of images into ``pixel_values`` (N, 3, H, W) float32 (+ ``high_res_pixel_values``)."""
        images = list(images)
        prepared = self._map(self.geometry, images)
        names = self.model_input_names
        outputs = {}
        antialiased = self.is_hybrid and self.config.low_res_resize == LOW_RES_ANTIALIASED
        for k, name in enumerate(names):
            if antialiased and k == 0:
                outputs[name] = np.empty((len(images), 3, self.config.size, self.config.size), dtype=np.float32)
                continue
            sizes = {p[k].size for p in prepared}
            if len(sizes) > 1:
                raise ProcessorConfigError(
                    f"{name}: processed images have different sizes {sorted(sizes)}; enable resize and pad"
                )
            width, height = sizes.pop() if sizes else (0, 0)
            outputs[name] = np.empty((len(images), 3, height, width), dtype=np.float32)
        luts = (self._lut, self._high_lut) if self.is_hybrid else (self._lut,)

        def normalise(i: int) -> None:
            for k, name in enumerate(names):
                if antialiased and k == 0:
                    self._antialiased_low_res(prepared[i][1], outputs[name][i])
                else:
                    _lut_into(prepared[i][k], luts[k], outputs[name][i])

        self._map(normalise, list(range(len(images))))
        return outputs

    def _antialiased_low_res(self, high: Image.Image, out: np.ndarray) -> None:
        """The original hybrid's low-res pixels: rescale the high-res image, resize (antialiased bilinear),
        normalise with the low-res mean/std (torchvision's Normalize: float32 subtract, then divide)."""
        c = self.config
        x = np.empty((3, high.size[1], high.size[0]), np.float32)
        _lut_into(high, self._rescale_lut, x)
        y = resize_antialiased(x, c.size, c.size)
        if c.do_normalize:
            mean = np.asarray(c.image_mean if c.image_mean is not None else (0.0,) * 3, np.float32)[:, None, None]
            std = np.asarray(c.image_std if c.image_std is not None else (1.0,) * 3, np.float32)[:, None, None]
            y = (y - mean) / std
        out[...] = y

    preprocess = __call__



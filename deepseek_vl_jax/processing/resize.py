"""The antialiased bilinear resize of a float image, as torch's `F.interpolate(mode="bilinear", antialias=True,
align_corners=False)` (hence torchvision's `Resize(size, antialias=True)` on tensors) computes it.

The original DeepSeek-VL-Hybrid (`HybridVisionTower.forward`) makes its low-resolution image this way: it resizes
the rescaled, not yet normalised, high-resolution tensor (1024 -> 384 px) inside the model. Separable: one
[out, in] weight matrix per axis with a triangle filter widened by the scale (`support = scale` when shrinking),
each row normalised to sum 1, computed in float32 arithmetic as ATen's `_compute_index_ranges_weights` does for
float input (float64 weights would differ from torch by up to 1e-5 at 1024 -> 384); the result is within 2e-7 of
torch's (summation order).
"""

from __future__ import annotations

import numpy as np

_F = np.float32


def antialiased_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch's antialiased bilinear resize along one axis."""
    scale = _F(in_size / out_size)
    support = scale if scale >= 1 else _F(1)
    invscale = _F(1) / scale if scale >= 1 else _F(1)
    m = np.zeros((out_size, in_size), _F)
    for i in range(out_size):
        center = scale * _F(i + 0.5)
        lo = max(int(center - support + _F(0.5)), 0)
        hi = min(int(center + support + _F(0.5)), in_size)
        w = np.maximum(_F(0), _F(1) - np.abs((np.arange(lo, hi, dtype=_F) - center + _F(0.5)) * invscale))
        total = _F(w.sum(dtype=_F))
        m[i, lo:hi] = w / total if total else w
    return m


def resize_antialiased(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] float32 -> [C, height, width] float32 (height pass, then width pass)."""
    mh = antialiased_bilinear_matrix(x.shape[1], height)
    mw = antialiased_bilinear_matrix(x.shape[2], width)
    y = np.einsum("Hh,chw->cHw", mh, x.astype(_F))
    return np.ascontiguousarray(np.einsum("Ww,cHw->cHW", mw, y), dtype=_F)

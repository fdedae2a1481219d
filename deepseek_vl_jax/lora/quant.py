"""The frozen base of QLoRA: symmetric int8 / int4 kernels with one float32 scale per output channel and group of
`group_size` inputs. int4 values are packed two to a byte (uint8) along the input axis, so the stored kernel is
half the bytes of int8 and an eighth of float32.

A deliberately small stand-in for the project's `quantization/` package (built in parallel), which can replace it.
Kernels are [..., in, out]; leading axes (a scanned stack's layers) are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_vl_jax.lora.config import BaseQuant

QUANT, SCALE = "kernel_q", "kernel_scale"  # leaf names that replace `kernel` in a quantized Dense
_MAX = {BaseQuant.INT8: 127.0, BaseQuant.INT4: 7.0}


def group(in_features: int, group_size: int) -> int:
    return group_size if in_features % group_size == 0 else in_features


def quantize(kernel: jax.Array, kind: BaseQuant, group_size: int) -> dict[str, jax.Array]:
    """kernel [..., I, O] -> {QUANT: int8 [..., I, O] or uint8 [..., I / 2, O], SCALE: float32 [..., I / g, O]}."""
    *lead, i, o = kernel.shape
    g = group(i, group_size)
    if kind is BaseQuant.INT4 and g % 2:
        raise ValueError(f"int4 needs an even number of inputs per group, the kernel has {i}")
    w = kernel.astype(jnp.float32).reshape(*lead, i // g, g, o)
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / _MAX[kind]
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -_MAX[kind], _MAX[kind]).astype(jnp.int8)
    if kind is BaseQuant.INT4:
        pairs = (q + 8).astype(jnp.uint8).reshape(*lead, i // g, g // 2, 2, o)
        packed = pairs[..., 0, :] | (pairs[..., 1, :] << 4)
        q = packed.reshape(*lead, i // 2, o)
    else:
        q = q.reshape(*lead, i, o)
    return {QUANT: q, SCALE: scale[..., 0, :]}


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The inverse of `quantize` (up to rounding): [..., I, O] in `dtype`."""
    *lead, groups, o = scale.shape
    if q.dtype == jnp.uint8:  # int4, two per byte
        half = q.reshape(*lead, groups, -1, o)
        lo = (half & 15).astype(jnp.int8) - 8
        hi = (half >> 4).astype(jnp.int8) - 8
        w = jnp.stack([lo, hi], axis=-2).reshape(*lead, groups, -1, o)
    else:
        w = q.reshape(*lead, groups, -1, o)
    w = w.astype(jnp.float32) * scale[..., None, :]
    return w.reshape(*lead, -1, o).astype(dtype)


def shapes(kernel_shape: tuple[int, ...], kind: BaseQuant, group_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of `quantize`'s output for a kernel shape, without computing anything."""
    *lead, i, o = kernel_shape
    g = group(i, group_size)
    q = (jax.ShapeDtypeStruct((*lead, i // 2, o), jnp.uint8) if kind is BaseQuant.INT4
         else jax.ShapeDtypeStruct((*lead, i, o), jnp.int8))
    return {QUANT: q, SCALE: jax.ShapeDtypeStruct((*lead, i // g, o), jnp.float32)}

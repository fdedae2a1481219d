"""Weight-only quantized tensors: int8 per output channel, int4 per group along the input axis (symmetric absmax).

A `QTensor` is a pytree of two arrays, `values` and `scales`, plus static metadata; `dequantize` turns it back into
a float array of the original shape. The quantized ("reduced") axis is the one a matmul contracts:

    kernel [..., in, out] (axis -2): int8 scales [..., 1, out]; int4 scales [..., in / group, out]
    embedding [..., V, D] (axis -1): int8 scales [..., V, 1]    (one scale per row: lookup and tied LM head)

int4 values are packed two to a byte along the reduced axis (element 2i in the low nibble, 2i + 1 in the high one),
so `values` is uint8 with that axis halved; int8 values are int8 of the original shape. Leading axes (e.g. the
decoder's stacked `layers` axis) are kept: each slice has its own scales.

Quantization runs on host (numpy), one tensor at a time, as weights are loaded; `dequantize` is jnp and runs
inside jit (each layer's weights are dequantized where they are used, never the whole model at once).

Error bound (`error_bound`): with s the stored scale of a channel or group and m its absmax,
|w - dequantize(quantize(w))| <= s / 2 + max(0, m - qmax * s), where the second term is the clipping that a scale
rounded down to its dtype can cause (zero for float32 scales up to rounding); qmax = 127 (int8) or 7 (int4).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class Scheme(str, enum.Enum):
    INT8 = "int8"  # per output channel
    INT4 = "int4"  # per group of `group_size` along the input axis


SCHEMES = tuple(s.value for s in Scheme)
QMAX = {Scheme.INT8: 127, Scheme.INT4: 7}
DEFAULT_GROUP_SIZE = 128


class QuantizationError(ValueError):
    """A quantization setting that cannot apply (unknown scheme, a group size that does not divide a width...)."""


def scheme_of(name) -> Scheme:
    if isinstance(name, Scheme):
        return name
    if name not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {name!r}; expected one of {', '.join(SCHEMES)}")
    return Scheme(name)


@struct.dataclass
class QTensor:
    """values: int8 [..., in, out] or uint8 packed int4 (reduced axis halved); scales: float, see module docstring.
    scheme, group_size (int4; 0 for int8), axis (the reduced axis, negative), shape (the float tensor's shape) are
    static."""

    values: jax.Array
    scales: jax.Array
    scheme: Scheme = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float tensor this stands for."""
        shape = list(self.values.shape)
        if self.scheme == Scheme.INT4:
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self):
        """The dtype of the scales (= the dtype `dequantize` returns by default)."""
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.values.shape)) * self.values.dtype.itemsize + \
            int(np.prod(self.scales.shape)) * self.scales.dtype.itemsize


def _groups(n: int, scheme: Scheme, group_size: int, what: str) -> int:
    if scheme == Scheme.INT8:
        return 1
    if group_size <= 0 or group_size % 2:
        raise QuantizationError(f"int4 group size must be a positive even number, got {group_size}")
    if n % group_size:
        raise QuantizationError(f"int4 group size {group_size} does not divide the input width {n} of {what}; "
                                f"choose a group size that divides it (e.g. --group-size {np.gcd(n, group_size)})")
    return n // group_size


def _grouped(x, axis: int, groups: int):
    """[..., n, ...] -> [..., groups, n / groups, ...] (axis negative: the group axis lands at axis - 1)."""
    shape = x.shape
    a = axis % len(shape)
    return x.reshape(shape[:a] + (groups, shape[a] // groups) + shape[a + 1:])


def quantize(w, scheme="int8", group_size: int = DEFAULT_GROUP_SIZE, axis: int = -2, scale_dtype=None,
             what: str = "tensor") -> QTensor:
    """Quantize a float array `w` (numpy or jax; computed on host in float32) along `axis` (negative).

    scale_dtype: the dtype of the scales (default: w's dtype). `what` names the tensor in errors.
    Returns a QTensor of numpy arrays."""
    scheme = scheme_of(scheme)
    if axis >= 0:
        raise ValueError("axis must be negative (counted from the end, so stacked leading axes are kept)")
    w = np.asarray(w)
    scale_dtype = np.dtype(scale_dtype or w.dtype)
    groups = _groups(w.shape[axis], scheme, group_size, what)
    if w.ndim > -axis + 1:  # stacked leading axes: one slice at a time (float temporaries of one slice only)
        first = quantize(w[0], scheme, group_size, axis, scale_dtype, what)
        values = np.empty((w.shape[0],) + first.values.shape, first.values.dtype)
        scales = np.empty((w.shape[0],) + first.scales.shape, first.scales.dtype)
        values[0], scales[0] = first.values, first.scales
        for i in range(1, w.shape[0]):
            part = quantize(w[i], scheme, group_size, axis, scale_dtype, what)
            values[i], scales[i] = part.values, part.scales
        return first.replace(values=values, scales=scales)
    qmax = QMAX[scheme]
    g = _grouped(w.astype(np.float32), axis, groups)  # group axis at `axis - 1`, members at `axis`
    absmax = np.max(np.abs(g), axis=axis, keepdims=True)
    scale = (absmax / qmax).astype(scale_dtype)
    s32 = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.round(g / np.where(s32 > 0, s32, 1)), 0)
    q = np.clip(q, -qmax, qmax).astype(np.int8).reshape(w.shape)
    scales = np.squeeze(scale, axis=axis)  # [..., groups, ...] in place of the reduced axis
    if scheme == Scheme.INT4:
        q = pack_int4(q, axis)
    return QTensor(q, scales, scheme, group_size if scheme == Scheme.INT4 else 0, axis)


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """int8 values in [-8, 7] -> uint8, two per byte along `axis` (which must have even length)."""
    q = np.moveaxis(q, axis, -1).astype(np.uint8) & 0xF
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.moveaxis(packed, -1, axis)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """The inverse of `pack_int4` (jnp, inside jit): uint8 [..., n / 2, ...] -> int8 [..., n, ...]."""
    p = packed.astype(jnp.int8)
    low = jnp.left_shift(p, 4) >> 4  # arithmetic shift sign-extends the nibble
    high = p >> 4
    both = jnp.stack([low, high], axis=axis)  # [..., n / 2, 2, ...]
    a = axis % packed.ndim
    return both.reshape(packed.shape[:a] + (packed.shape[a] * 2,) + packed.shape[a + 1:])


def int_values(qt: QTensor) -> jax.Array:
    """The integer values as int8 of the float tensor's shape."""
    values = jnp.asarray(qt.values)
    return unpack_int4(values, qt.axis) if qt.scheme == Scheme.INT4 else values


def dequantize(qt: QTensor, dtype=None) -> jax.Array:
    """QTensor -> float array of `qt.shape` in `dtype` (default: the scales' dtype); jnp, fine inside jit.
    The product is taken in float32 and rounded once to `dtype`."""
    dtype = dtype or qt.scales.dtype
    q = int_values(qt).astype(jnp.float32)
    scales = jnp.asarray(qt.scales).astype(jnp.float32)
    groups = scales.shape[qt.axis]
    out = _grouped(q, qt.axis, groups) * jnp.expand_dims(scales, qt.axis)
    return out.reshape(qt.shape).astype(dtype)


def error_bound(w, qt: QTensor) -> np.ndarray:
    """The closed-form bound on |w - dequantize(qt)| per element (numpy, shape of w): s / 2 plus the clipping a
    rounded-down scale can cause, max(0, absmax - qmax * s), for each element's channel or group."""
    w = np.asarray(w, np.float32)
    s = np.asarray(qt.scales, np.float32)
    groups = s.shape[qt.axis]
    g = _grouped(np.abs(w), qt.axis, groups)
    absmax = np.max(g, axis=qt.axis, keepdims=True)
    s = np.expand_dims(s, qt.axis)
    bound = s / 2 + np.maximum(0.0, absmax - QMAX[qt.scheme] * s)
    return np.broadcast_to(bound, g.shape).reshape(w.shape)


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)

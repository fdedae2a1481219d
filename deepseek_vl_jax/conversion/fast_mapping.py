"""`hf_mapping.to_flax` / `to_hf` for whole checkpoints: the same table and transforms, with a fast transpose,
writing into one preallocated array per leaf (the dtype cast folded into that copy).

numpy copies a transposed 2-D view element by element in destination order, reading one cache line per element
(~0.05-0.1 GB/s for bfloat16 weights on one core); XLA's CPU transpose is tiled and vectorised (~8x faster), and
a tile-by-tile numpy copy (`transpose_into_numpy`, ~3x) is the fallback for dtypes XLA does not take. Results are
bit-identical to `hf_mapping.to_flax` / `to_hf` (tested), which stay the reference.
"""

from __future__ import annotations

from typing import Callable, Iterator

import functools

import jax
import numpy as np

from deepseek_vl_jax.hf_mapping import Entry, Transform

BLOCK = 128  # tile edge of the numpy fallback
CHUNK_BYTES = 32 * 2**20  # source rows transposed per XLA call
_XLA_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jax.numpy.bfloat16)}


@functools.lru_cache(maxsize=1)
def _cpu_transpose():
    cpu = jax.devices("cpu")[0]
    fn = jax.jit(lambda a: a.T)
    return lambda x: np.asarray(fn(jax.device_put(x, cpu)))


def transpose_into_numpy(src: np.ndarray, dst: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """dst[...] = src.T for 2-D arrays, tile by tile so both tiles stay in cache."""
    m, n = src.shape
    for i in range(0, m, block):
        for j in range(0, n, block):
            dst[j:j + block, i:i + block] = src[i:i + block, j:j + block].T
    return dst


def transpose_into(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """dst[...] = src.T for 2-D arrays (dst's dtype may differ: the cast happens in the final copy). XLA on the
    CPU for float dtypes (a transposed copy of one tensor at a time), numpy tiles otherwise."""
    if dst.shape != src.shape[::-1] or src.ndim != 2:
        raise ValueError(f"transpose_into: {src.shape} into {dst.shape}")
    if np.dtype(src.dtype) in _XLA_DTYPES and src.size:
        # row chunks of <= CHUNK_BYTES: XLA's input and output copies stay small for a 400 MB LM head
        rows = max(1, CHUNK_BYTES // max(1, src.shape[1] * src.dtype.itemsize))
        for i in range(0, src.shape[0], rows):
            dst[:, i:i + rows] = _cpu_transpose()(src[i:i + rows])
        return dst
    return transpose_into_numpy(src, dst)


def _put(entry: Entry, x: np.ndarray, dst: np.ndarray, to_flax: bool) -> None:
    if entry.transform is Transform.LINEAR:
        transpose_into(x, dst)
    else:
        dst[...] = entry.transform.to_flax(x) if to_flax else entry.transform.to_hf(x)


def leaf_from_hf(entry: Entry, get: Callable[[str], np.ndarray], dtype,
                 after_each: Callable[[], None] | None = None) -> np.ndarray:
    """The Flax leaf of `entry` in `dtype` from HF tensors (`get(key)`); `after_each()` runs after each HF tensor
    has been consumed (e.g. to release its memory-mapped pages)."""
    out = np.empty(entry.shape, dtype)
    for i, key in enumerate(entry.hf_keys):
        _put(entry, np.asarray(get(key)), out[i] if entry.stacked else out, to_flax=True)
        if after_each is not None:
            after_each()
    return out


def hf_from_leaf(entry: Entry, leaf: np.ndarray, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """The HF tensors (key, contiguous array in `dtype`) of one Flax leaf, one at a time."""
    leaf = np.asarray(leaf)
    parts = zip(entry.hf_keys, leaf) if entry.stacked else [(entry.hf_keys[0], leaf)]
    shape = entry.hf_shape()
    for key, x in parts:
        out = np.empty(shape, dtype)
        _put(entry, x, out, to_flax=False)
        yield key, out

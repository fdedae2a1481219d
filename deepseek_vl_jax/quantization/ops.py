"""The quantized matmuls and the Flax method interceptor that routes the model's layers to them.

The model code does not know about quantization (qwix's shape): `quantized_layers()` is a context in which every
`nn.Dense` whose kernel is a `QTensor`, and every `nn.Embed` whose table is one, computes from the quantized
weights; layers with float weights run unchanged. It is active in the jitted forward and generation programs.

What the compiled program does (HLO inspected on CPU):
- TPU/GPU, and CPU for many rows (a prompt): int8 Dense is dot(x, convert(values)) * scales, the per-channel scale
  applied to the [.., out] result; int4 is dot(x, unpack(values) * scales). The convert (or unpack and scale) is the
  dot's operand: TPU/GPU fuse it into the dot, so HBM holds and reads only the quantized weights. XLA:CPU's dot does
  not fuse producers: there a loop fusion writes the layer's whole kernel as float32 into a temporary, which the dot
  then reads (9 bytes moved per int8 weight where float32 moves 4); `after` keeps that to one layer at a time.
- CPU, a few rows (a decode step, at most `BLOCKED_ROWS`), by `DECODE_FORM`:
  - `DecodeForm.WHOLE` (default): int8 as above; int4 as two nibble planes (`planes_dot`): x's even columns times
    the low nibbles, its odd ones times the high nibbles, each plane scaled as it is unpacked (no interleave).
    Each layer's conversion writes one float kernel (a temporary, one at a time through `after`). Fewest kernels:
    XLA:CPU keeps ~60-100 KB of runtime memory per compiled kernel (fusion) whatever its size, and a decode step
    converts 7 kernels per layer (benchmarks/bench_quantize.py `programs_kernels`).
  - `DecodeForm.BLOCKED`: `blocked_dot`, a `fori_loop` over blocks of `BLOCK_ROWS` input rows: each block's int8
    rows (contiguous in the [in, out] kernel), or its packed int4 rows unpacked as two nibble planes, are converted
    right before a small dot and accumulated, the scale applied to the block's [.., out] result. The float block
    (64 x out floats) stays in cache and the step's temporaries are a fraction of one layer, but each loop costs
    5-9 kernels (the 0.45B int4 decode step: 79 MB kept against 35 MB for float32).
- Embeddings: the gathered int8 rows times their row scales; the tied LM head is dot(h, convert(values)^T) * scales,
  on CPU for a few rows a `lax.map` over blocks of table rows.
"""

from __future__ import annotations

import contextlib
import enum
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax.quantization.qtensor import QTensor, Scheme, dequantize, int_values

BLOCK_ROWS = 64  # kernel rows converted per step of `blocked_dot`: 64 x 2816 float32 = 720 KB, within L2
BLOCKED_ROWS = 32  # at most this many activation rows (decode steps, small batches) take the `DECODE_FORM`
TABLE_BLOCK = 256  # table rows per step of the blocked tied LM head


class DecodeForm(enum.Enum):
    """How a Dense layer computes from quantized weights on CPU for a few rows (see the module docstring)."""

    WHOLE = "whole"
    BLOCKED = "blocked"


DECODE_FORM = DecodeForm.WHOLE


def after(qt: QTensor, x: jax.Array) -> QTensor:
    """`qt` with its values made to depend on the activation `x` (on CPU; unchanged elsewhere).

    XLA:CPU's dot does not fuse its operand's producer, so each layer's kernel is converted into a float temporary;
    as the conversions depend only on parameters, its scheduler runs them all first and holds every layer's
    dequantized kernel at once (a float copy of the decoder, measured with `memory_analysis`). Adding a zero derived
    from `x` (`x > inf` is False for every value, NaN included) ties each conversion to its layer's input, so one
    temporary is live at a time. TPU/GPU fuse the conversion into the dot: nothing to do there."""
    if jax.default_backend() != "cpu":
        return qt
    zero = (x.reshape(-1)[0] > jnp.inf).astype(qt.values.dtype)
    return qt.replace(values=jnp.asarray(qt.values) + zero)


def _on_cpu_without_mesh() -> bool:
    """Where the blocked forms apply: XLA:CPU (its dot does not fuse the convert) outside a device mesh (a block
    loop over a sharded input axis would gather the weight)."""
    return jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def _block(n: int, size: int) -> int:
    return math.gcd(n, size)


def blocked_dot(x: jax.Array, q: QTensor, dtype) -> jax.Array:
    """x [M, K] @ a 2-D QTensor kernel [K, N] (axis -2) -> [M, N] in `dtype`, accumulated in float32 over blocks of
    K rows (`BLOCK_ROWS`, or the largest divisor of K / of the int4 group size below it), each block converted
    right before its dot. int4: the block's packed rows are unpacked as two planes (even rows from the low nibbles,
    odd rows from the high ones) contracted with x's even and odd columns, then scaled by the block's group scale."""
    k, n = q.shape
    acc = jnp.zeros((x.shape[0], n), jnp.float32)
    values = jnp.asarray(q.values)
    if q.scheme == Scheme.INT8:
        kb = _block(k, BLOCK_ROWS)

        def body(i, acc):
            w = jax.lax.dynamic_slice_in_dim(values, i * kb, kb, 0).astype(dtype)
            xi = jax.lax.dynamic_slice_in_dim(x, i * kb, kb, 1)
            return acc + jnp.dot(xi, w, preferred_element_type=jnp.float32)

        y = jax.lax.fori_loop(0, k // kb, body, acc) * jnp.asarray(q.scales).reshape(-1).astype(jnp.float32)
        return y.astype(dtype)
    kb = _block(q.group_size, BLOCK_ROWS)  # a block lies within one group
    half, per_group = kb // 2, q.group_size // kb
    x_even, x_odd = x[:, 0::2], x[:, 1::2]
    scales = jnp.asarray(q.scales).astype(jnp.float32)  # [K / group, N]

    def body4(i, acc):
        p = jax.lax.dynamic_slice_in_dim(values, i * half, half, 0).astype(jnp.int8)
        low = (jnp.left_shift(p, 4) >> 4).astype(dtype)  # rows 2j (sign-extended low nibble)
        high = (p >> 4).astype(dtype)  # rows 2j + 1
        xe = jax.lax.dynamic_slice_in_dim(x_even, i * half, half, 1)
        xo = jax.lax.dynamic_slice_in_dim(x_odd, i * half, half, 1)
        part = jnp.dot(xe, low, preferred_element_type=jnp.float32) + jnp.dot(xo, high,
                                                                            preferred_element_type=jnp.float32)
        return acc + part * jax.lax.dynamic_slice_in_dim(scales, i // per_group, 1, 0)

    return jax.lax.fori_loop(0, k // kb, body4, acc).astype(dtype)


def blocked_attend(x: jax.Array, table: QTensor, dtype) -> jax.Array:
    """x [M, D] against every row of an int8 QTensor table [V, D] (per-row scales) -> [M, V]: a `lax.map` over
    blocks of `TABLE_BLOCK` rows, each converted right before its dot."""
    v, d = table.shape
    vb = _block(v, TABLE_BLOCK)
    values = jnp.asarray(table.values).reshape(v // vb, vb, d)
    scales = jnp.asarray(table.scales).astype(jnp.float32).reshape(v // vb, 1, vb)

    def block(args):
        w, s = args
        return jax.lax.dot_general(x, w.astype(dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32) * s

    out = jax.lax.map(block, (values, scales))  # [V / vb, M, vb]
    return out.transpose(1, 0, 2).reshape(x.shape[0], v).astype(dtype)


def planes_dot(x: jax.Array, q: QTensor, dtype) -> jax.Array:
    """x [M, K] @ a 2-D int4 QTensor kernel [K, N] (axis -2) -> [M, N] in `dtype`: the packed bytes unpacked as two
    planes [K / 2, N] (rows 2j from the low nibbles, 2j + 1 from the high ones), each scaled by its group's scale,
    contracted with x's even and odd columns. Same products as `dequantize` (taken in float32, rounded once to
    `dtype`), without its interleaving of the two planes."""
    k, n = q.shape
    g = q.group_size
    p = jnp.asarray(q.values).astype(jnp.int8).reshape(k // g, g // 2, n)
    s = jnp.asarray(q.scales).astype(jnp.float32)[:, None, :]  # [K / group, 1, N]
    plane = lambda nibbles: (nibbles.astype(jnp.float32) * s).reshape(k // 2, n).astype(dtype)
    low, high = plane(jnp.left_shift(p, 4) >> 4), plane(p >> 4)  # arithmetic shifts sign-extend
    return (jnp.dot(x[:, 0::2], low, preferred_element_type=jnp.float32)
            + jnp.dot(x[:, 1::2], high, preferred_element_type=jnp.float32)).astype(dtype)


def _few_rows(x: jax.Array) -> bool:
    return math.prod(x.shape[:-1]) <= BLOCKED_ROWS and _on_cpu_without_mesh()


def _blocked(x: jax.Array, q: QTensor, contract: int) -> bool:
    if q.ndim != 2 or not _few_rows(x):
        return False
    if contract == 1:
        return q.scheme == Scheme.INT8
    if DECODE_FORM != DecodeForm.BLOCKED:
        return False
    return _block(q.group_size if q.scheme == Scheme.INT4 else q.shape[0], BLOCK_ROWS) >= 16


def _dot(x: jax.Array, q: QTensor, contract: int, dtype) -> jax.Array:
    """x [..., K] contracted with axis `contract` of a 2-D QTensor; int8 scales (one per output) applied after the
    dot, int4 dequantized (per group) before it; on CPU for a few rows the `DECODE_FORM` (the tied LM head: always
    the blocked form, its table being the largest weight)."""
    x = x.astype(dtype)
    if _blocked(x, q, contract):
        flat = x.reshape(-1, x.shape[-1])
        y = blocked_dot(flat, q, dtype) if contract == 0 else blocked_attend(flat, q, dtype)
        return y.reshape(x.shape[:-1] + (y.shape[-1],))
    q = after(q, x)
    dims = (((x.ndim - 1,), (contract,)), ((), ()))
    if q.scheme == Scheme.INT8:
        y = jax.lax.dot_general(x, jnp.asarray(q.values).astype(dtype), dims, preferred_element_type=dtype)
        return y * jnp.asarray(q.scales).reshape(-1).astype(dtype)
    if contract == 0 and q.ndim == 2 and _few_rows(x):
        y = planes_dot(x.reshape(-1, x.shape[-1]), q, dtype)
        return y.reshape(x.shape[:-1] + (y.shape[-1],))
    return jax.lax.dot_general(x, dequantize(q, dtype), dims, preferred_element_type=dtype)


def dense(x: jax.Array, kernel: QTensor, dtype) -> jax.Array:
    """x [..., in] @ kernel [in, out] (a QTensor with axis -2) -> [..., out] in `dtype`."""
    if kernel.ndim != 2 or kernel.axis != -2:
        raise ValueError(f"a quantized Dense kernel must be 2-D quantized along its input axis, got {kernel.shape}")
    return _dot(x, kernel, 0, dtype)


def embed_lookup(ids: jax.Array, table: QTensor, dtype) -> jax.Array:
    """ids [...] (int) -> rows [..., D] of a QTensor table [V, D] quantized along D (axis -1)."""
    q = jnp.take(int_values(table), ids, axis=0).astype(jnp.float32)  # [..., D]
    s = jnp.take(jnp.asarray(table.scales).astype(jnp.float32), ids, axis=0)  # [..., G]
    groups = s.shape[-1]
    q = q.reshape(q.shape[:-1] + (groups, q.shape[-1] // groups)) * s[..., None]
    return q.reshape(q.shape[:-2] + (-1,)).astype(dtype)


def embed_attend(h: jax.Array, table: QTensor, dtype) -> jax.Array:
    """h [..., D] against every row of a QTensor table [V, D] -> [..., V] (the tied LM head)."""
    return _dot(h, table, 1, dtype)


def _variable(module: nn.Module, name: str):
    if module.scope is None or not module.has_variable("params", name):
        return None
    value = module.get_variable("params", name)
    return value if isinstance(value, QTensor) else None


def _interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if type(module) is nn.Dense and method == "__call__":
        kernel = _variable(module, "kernel")
        if kernel is not None:
            x = args[0]
            y = dense(x, kernel, module.dtype or x.dtype)
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(y.dtype)
            return y
    elif type(module) is nn.Embed and method in ("__call__", "attend"):
        table = _variable(module, "embedding")
        if table is not None:
            dtype = module.dtype or table.dtype
            if method == "__call__":
                return embed_lookup(args[0], table, dtype)
            return embed_attend(args[0], table, dtype)
    return next_fun(*args, **kwargs)


def quantized_layers() -> contextlib.AbstractContextManager:
    """Within this context (at trace time), Dense and Embed layers whose weights are QTensors use them."""
    return nn.intercept_methods(_interceptor)

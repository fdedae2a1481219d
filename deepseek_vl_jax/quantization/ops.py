"""The quantized matmuls and the Flax method interceptor that routes the model's layers to them.

The model code does not know about quantization (qwix's shape): `quantized_layers()` is a context in which every
`nn.Dense` whose kernel is a `QTensor`, and every `nn.Embed` whose table is one, computes from the quantized
weights; layers with float weights run unchanged. It is active in the jitted forward and generation programs.

What the compiled program does (HLO inspected on CPU; the same graph goes to TPU/GPU):
- int8 Dense: dot(x, convert(values)) * scales: the int8 kernel is the dot's operand through a convert, and the
  per-channel scale is applied to the [.., out] result. On TPU/GPU XLA fuses the convert into the dot's operand
  fusion, so HBM holds and reads only the int8 weights.
- int4 Dense: dot(x, unpack(values) * scales): the uint8-packed kernel is unpacked (shifts), scaled per group and
  fed to the dot, one fusion per layer; no dequantized copy of the model exists. XLA:CPU's dot does not fuse
  producers: there a loop fusion writes the layer's kernel as float32 into a temporary, then the dot reads it; `after`
  keeps that to one layer's kernel at a time.
- Embeddings: the gathered int8 rows times their row scales; the tied LM head is dot(h, convert(values)^T) * scales.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax.quantization.qtensor import QTensor, Scheme, dequantize, int_values


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


def _dot(x: jax.Array, q: QTensor, contract: int, dtype) -> jax.Array:
    """x [..., K] contracted with axis `contract` of a 2-D QTensor; int8 scales (one per output) applied after the
    dot, int4 dequantized (per group) before it."""
    q = after(q, x)
    x = x.astype(dtype)
    dims = (((x.ndim - 1,), (contract,)), ((), ()))
    if q.scheme == Scheme.INT8:
        y = jax.lax.dot_general(x, jnp.asarray(q.values).astype(dtype), dims, preferred_element_type=dtype)
        return y * jnp.asarray(q.scales).reshape(-1).astype(dtype)
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

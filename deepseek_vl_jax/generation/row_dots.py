"""One-row Dense layers on CPU as one batched dot over blocks of the kernel's input rows.

A batch-1 decode step is a chain of matrix-vector products x [1, K] @ kernel [K, N], and reading the kernels is its
whole cost. XLA:CPU runs such a product over a kernel in Flax's [in, out] layout on one thread: pinned to one core
it is about as fast as on two, while the same product over a kernel stored [out, in] uses both. The kernel's K rows
split into `BLOCKS` blocks are a free reshape [BLOCKS, K / BLOCKS, N] of the same memory (each block contiguous);
a dot batched over the blocks, then a sum over them, is spread across threads by the blocks, with no copy of any
weight and no change of layout. `benchmarks/bench_row_dots.py` (results/row_dots.json), a native AVX2 AMD EPYC
with 2 cores, GB/s of weight read in a chain of distinct kernels, YNNPACK dots off as in the decoding programs,
medians of 5 alternating rounds (pinned to one core in brackets):

    kernel [K, N]   one dot       [out, in] copy   16 blocks
    1024 x 2816     12.6 (11.9)   16.9 (13.1)      18.1 (13.4)
    2816 x 1024     11.2 (7.4)    17.2 (13.8)      18.4 (12.8)
    1024 x 1024     12.7 (12.0)   12.9 (12.6)      12.7 (12.4)
    1024 x 102400   21.2 (12.5)   20.9 (12.3)      19.8 (11.4)   (the LM head: one dot already uses both)

The batch-1 decode step of the 0.45B benchmark shape: 66.3 ms in blocks vs 79.1 ms (x1.19, every round faster,
same greedy tokens). From 2 rows on the plain dot is the faster by far (1024 x 2816 at 2 / 8 rows: 10.3 / 8.0 GB/s
against 2.8 / 2.9 in blocks), so only one-row products take this form. The 16 partial sums are added in float32:
the result is closer to float64 than the single dot's (2.2e-7 against 1.3e-6 of the largest output at K = 2816,
tests/test_row_dots.py), so it differs from the plain form by float32 rounding.

`one_row_dots()`: a context (at trace time) in which every float `nn.Dense` call with one input row on the CPU,
whose kernel's input axis divides into `BLOCKS` blocks of at least 4 rows, computes this way; every other call runs
unchanged (QTensor kernels go on to `quantization.quantized_layers`). The generation and serving programs trace in
it when they run without a device mesh (a mesh may shard the input axis). TPU/GPU programs never take the form.
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Blocks of kernel rows: 64+ rows each from K = 1024. A one-off sweep on the AVX2 EPYC (not in the benchmark), 1 row,
# 1024 x 2816 / 2816 x 1024: 8, 16, 32 blocks 18.4, 18.5, 18.2 / 15.9, 17.3, 15.6 GB/s; 2 and 4 blocks 12.5, 13.1 /
# 11.5, 15.6.
BLOCKS = 16
# Read when `loop.programs` / serving's `Programs` are made: benchmarks and tests compare both forms in one process.
# Not part of a `program_cache` key: a store holds the form of the process that compiled its programs.
ENABLED = True


def blocked_matvec(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] with one row in all (prod of the leading axes = 1) @ kernel [K, N] -> [..., N] in float32, as a dot
    batched over `BLOCKS` contiguous blocks of kernel rows, then summed."""
    k, n = kernel.shape
    xb = x.reshape(BLOCKS, k // BLOCKS)
    parts = jnp.einsum("gk,gkn->gn", xb, kernel.reshape(BLOCKS, k // BLOCKS, n),
                       preferred_element_type=jnp.float32)
    return parts.sum(0).reshape(*x.shape[:-1], n)


def applies(x: jax.Array, kernel) -> bool:
    """Whether a Dense call on x with this kernel takes the blocked form."""
    return (isinstance(kernel, jax.Array) and kernel.ndim == 2 and jnp.issubdtype(kernel.dtype, jnp.floating)
            and math.prod(x.shape[:-1]) == 1 and kernel.shape[0] % BLOCKS == 0 and kernel.shape[0] >= 4 * BLOCKS
            and jax.default_backend() == "cpu")


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if type(module) is nn.Dense and context.method_name == "__call__" and module.scope is not None \
            and module.has_variable("params", "kernel") and not kwargs and len(args) == 1:
        x, kernel = args[0], module.get_variable("params", "kernel")
        if applies(x, kernel):
            dtype = module.dtype or jnp.result_type(x, kernel)
            y = blocked_matvec(x.astype(dtype), kernel.astype(dtype))
            if module.use_bias:
                y = y + module.get_variable("params", "bias").astype(jnp.float32)
            return y.astype(dtype)
    return next_fun(*args, **kwargs)


def one_row_dots(active: bool = True) -> contextlib.AbstractContextManager:
    """Within this context (at trace time), one-row float Dense calls on the CPU use `blocked_matvec`; a no-op
    context when not `active`."""
    return nn.intercept_methods(_interceptor) if active else contextlib.nullcontext()

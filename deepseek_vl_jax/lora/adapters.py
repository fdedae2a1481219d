"""LoRA adapters over the unchanged model: found by name pattern in the Flax tree, applied by intercepting Dense
calls, and folded into the base for export and inference.

The adapters live in their own top-level collection, `params["lora"]`, mirroring the paths of the Dense modules
they adapt (`params["lora"]["language_model"]["layers"]["self_attn"]["q_proj"] = {"lora_a": [L, I, r],
"lora_b": [L, r, O]}`). So a trainable mask is a top-level split (the base gets no gradient and no optimizer state),
and a scanned stack's adapters are stacked like its kernels and sliced by the same `nn.scan`.

For the forward pass the adapters are put next to the kernels they adapt (`inject`) and an interceptor
(`flax.linen.intercept_methods`) adds `scale * dropout(x) @ A @ B` to each adapted Dense's output. A QLoRA base is
`deepseek_vl_jax.quantization`'s: a `kernel` that is a `QTensor`, computed from by `quantization.quantized_layers()`
(active in `apply`), one layer at a time inside the scan. The model code knows nothing of either (the shape qwix
uses, see the package docstring).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_vl_jax import common
from deepseek_vl_jax.lora.config import LoraConfig
from deepseek_vl_jax import quantization
from deepseek_vl_jax.quantization import QTensor, dequantize, quantized_layers

ADAPTERS = "lora"  # the top-level parameter collection of the adapters
LORA_A, LORA_B = "lora_a", "lora_b"
KERNEL, STACKED = "kernel", "layers"

Path = tuple[str, ...]


class LoraError(ValueError):
    """A LoRA setting that does not fit the model."""


def _dense_modules(tree: Mapping, prefix: Path = ()):
    """(path, kernel leaf (an array or a QTensor), stacked) of every Dense module in a param tree."""
    for k, v in tree.items():
        if not isinstance(v, Mapping):
            continue
        path = prefix + (str(k),)
        leaf = v.get(KERNEL)
        stacked = STACKED in path
        if leaf is not None and not isinstance(leaf, Mapping) and len(_shape(leaf)) == 2 + int(stacked):
            yield path, leaf, stacked
        else:
            yield from _dense_modules(v, path)


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "value", leaf).shape)


def targets(params: Mapping, config: LoraConfig) -> list[Path]:
    """The Dense module paths the config's patterns select (each pattern must select something)."""
    base = {k: v for k, v in params.items() if k != ADAPTERS}
    paths = [p for p, _, _ in _dense_modules(base)]
    chosen = []
    for pattern in config.targets:
        rx = re.compile(pattern)
        hits = [p for p in paths if rx.fullmatch("/".join(p))]
        if not hits:
            sample = ", ".join("/".join(p) for p in paths[:6])
            raise LoraError(f"lora target {pattern!r} matches no Dense module (module paths look like {sample}, ...)")
        chosen += [p for p in hits if p not in chosen]
    return chosen


def get_path(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


# ------------------------------------------------------------------------------------------ abstract (boxed) form
def abstract(boxed: Mapping, config: LoraConfig, dtype=jnp.float32) -> dict:
    """The boxed abstract params (`pretrained.abstract_params`) of a LoRA model: the base's (float; a QLoRA base's
    quantized form is `quantization`'s, see `training.state`) and the `lora` collection. Logical axes: A is
    [(layers,) in-axis, lora_rank], B is [(layers,) lora_rank, out-axis], so `sharding.RULES` shards them like the
    kernel they adapt."""
    out = _copy(boxed)
    for path in targets(boxed, config):
        module = get_path(out, path)
        box = module[KERNEL]
        names, shape = tuple(box.names), _shape(box)
        lead, (i, o) = shape[:-2], shape[-2:]
        a = jax.ShapeDtypeStruct((*lead, i, config.rank), dtype)
        b = jax.ShapeDtypeStruct((*lead, config.rank, o), dtype)
        set_path(out, (ADAPTERS, *path), {
            LORA_A: nn.LogicallyPartitioned(a, (*names[:-1], common.LORA_RANK)),
            LORA_B: nn.LogicallyPartitioned(b, (*names[:-2], common.LORA_RANK, names[-1]))})
    return out


# -------------------------------------------------------------------------------------------------- concrete
def init_adapter(rng: jax.Array, kernel_shape: tuple[int, ...], rank: int, zero_b: bool = True,
                 dtype=jnp.float32) -> dict[str, jax.Array]:
    """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(I), 1/sqrt(I)), B = 0 (random when not `zero_b`,
    for tests that need a non-trivial adapter)."""
    *lead, i, o = kernel_shape
    ka, kb = jax.random.split(rng)
    bound = 1.0 / i**0.5
    a = jax.random.uniform(ka, (*lead, i, rank), dtype, -bound, bound)
    b = jnp.zeros((*lead, rank, o), dtype) if zero_b else jax.random.uniform(kb, (*lead, rank, o), dtype, -bound,
                                                                              bound)
    return {LORA_A: a, LORA_B: b}


def add_adapters(params: Mapping, config: LoraConfig, rng: jax.Array, shardings=None, zero_b: bool = True) -> dict:
    """A LoRA model's params from a base model's (float or quantized): the base's arrays as they are (not copied)
    and the `lora` collection, initialised. With `shardings` (of the `lora` collection of `abstract(...)`'s tree)
    the adapters are created on their shards."""
    paths = targets(params, config)
    shapes = [tuple(get_path(params, p)[KERNEL].shape) for p in paths]

    def build(rng):
        out: dict = {}
        for n, (path, shape) in enumerate(zip(paths, shapes)):
            set_path(out, path, init_adapter(jax.random.fold_in(rng, n), shape, config.rank, zero_b))
        return out

    adapters = jax.jit(build, out_shardings=shardings)(rng)
    return {**{k: v for k, v in params.items() if k != ADAPTERS}, ADAPTERS: adapters}


def inject(params: Mapping) -> dict:
    """params with each adapter pair put into the Dense module it adapts (what the interceptor reads)."""
    if ADAPTERS not in params:
        return dict(params)
    out = _copy({k: v for k, v in params.items() if k != ADAPTERS})

    def walk(tree, path):
        for k, v in tree.items():
            if LORA_A in v:
                get_path(out, path + (k,)).update(v)
            else:
                walk(v, path + (k,))

    walk(params[ADAPTERS], ())
    return out


def _frozen_quantized_dense(module: nn.Dense, x: jax.Array, kernel: QTensor) -> jax.Array:
    """nn.Dense from a frozen QTensor kernel, rematerialised: the backward pass dequantizes the kernel again for the
    input gradient instead of keeping it as a residual (in a scanned decoder that would stack a float copy of
    every layer's kernel, the very copy QLoRA avoids)."""
    dtype = module.dtype or x.dtype

    @jax.checkpoint
    def dense(x, values, scales):
        return quantization.dense(x, kernel.replace(values=values, scales=scales), dtype)

    y = dense(x, kernel.values, kernel.scales)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(h: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """The LoRA term `scale * (h @ a) @ b`: h [..., I], a [I, r], b [r, O] -> [..., O].

    Its backward pass is written out because of how XLA:CPU lays out the automatic one: the gradient of b came out
    as a dot reading the output gradient [N, O] transposed, and that transpose was fused into the elementwise
    producer of the gradient (e.g. the SiLU backward of gate_proj), a loop writing [O, N] with strided reads that
    took longer than the layer's two big matrix products together. Here every dot contracts the token axis N of
    two row-major [N, .] operands, which XLA reads as they are.
    """
    return (h @ a) @ b * scale


def _lora_delta_fwd(h, a, b, scale):
    ha = h @ a
    return ha @ b * scale, (h, a, b, ha)


def _lora_delta_bwd(scale, res, g):
    h, a, b, ha = res
    n = g.size // g.shape[-1]
    g2 = g.reshape(n, g.shape[-1]) * jnp.asarray(scale, g.dtype)  # [N, O]
    gha = g2 @ b.T  # [N, r]
    dh = (gha @ a.T).reshape(h.shape)
    da = jnp.einsum("ni,nr->ir", h.reshape(n, h.shape[-1]), gha)
    db = jnp.einsum("nr,no->ro", ha.reshape(n, ha.shape[-1]), g2)
    return dh, da, db


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def interceptor(config: LoraConfig, deterministic: bool = True):
    """A `nn.intercept_methods` interceptor: Dense calls of adapted modules get the LoRA term
    `(alpha / r) * dropout(x) @ A @ B` (computed in the module's dtype) added to their output. A QTensor kernel's
    output is `_frozen_quantized_dense`'s; other Dense calls go on to the next interceptor
    (`quantization.quantized_layers`, for QTensor embeddings) or nn.Dense."""

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not isinstance(m, nn.Dense):
            return next_fun(*args, **kwargs)
        kernel = m.get_variable("params", KERNEL) if m.has_variable("params", KERNEL) else None
        adapted = m.has_variable("params", LORA_A)
        x = args[0]
        if isinstance(kernel, QTensor) and kernel.ndim == 2:
            y = _frozen_quantized_dense(m, x, kernel)
        else:
            y = next_fun(*args, **kwargs)
        if not adapted:
            return y
        a, b = m.get_variable("params", LORA_A), m.get_variable("params", LORA_B)
        h = x
        if config.dropout and not deterministic:
            h = nn.Dropout(config.dropout, deterministic=False)(h, rng=m.make_rng("dropout"))
        h, a, b = nn.dtypes.promote_dtype(h, a, b, dtype=m.dtype)
        return y + lora_delta(h, a, b, config.scale).astype(y.dtype)

    return intercept


def apply(module: nn.Module, params: Mapping, *args, config: LoraConfig, method=None, rngs=None, **kwargs) -> Any:
    """`module.apply` of a LoRA model (params with a `lora` collection and/or a base of QTensors). With `rngs`
    holding a "dropout" key, LoRA dropout is active."""
    deterministic = not (rngs and "dropout" in rngs)
    # the outer context's interceptor runs first: LoRA's, whose next step is the quantized (or plain) Dense
    with nn.intercept_methods(interceptor(config, deterministic)), quantized_layers():
        return module.apply({"params": inject(params)}, *args, method=method, rngs=rngs, **kwargs)


def is_lora(params: Mapping) -> bool:
    return ADAPTERS in params


def merge(params: Mapping, config: LoraConfig) -> dict:
    """The plain model's params: each adapted kernel := base (dequantized) + (alpha / r) * A @ B, in float32 and
    then the base's dtype (float32 for a quantized base); the `lora` collection removed."""
    out = _copy({k: v for k, v in params.items() if k != ADAPTERS})
    adapters = params.get(ADAPTERS, {})
    for path, _, _ in list(_dense_modules(out)):
        module = get_path(out, path)
        if isinstance(module[KERNEL], QTensor):
            module[KERNEL] = dequantize(module[KERNEL], jnp.float32)
        try:
            pair = get_path(adapters, path)
        except KeyError:
            continue
        kernel = module[KERNEL]
        delta = jnp.einsum("...ir,...ro->...io", pair[LORA_A].astype(jnp.float32), pair[LORA_B].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        module[KERNEL] = (kernel.astype(jnp.float32) + config.scale * delta).astype(kernel.dtype)
    return out


def adapter_paths(params: Mapping) -> list[Path]:
    """Paths (module paths, as in the base tree) of the adapters present in `params`."""
    out = []

    def walk(tree, path):
        for k, v in tree.items():
            if LORA_A in v:
                out.append(path + (k,))
            else:
                walk(v, path + (k,))

    walk(params.get(ADAPTERS, {}), ())
    return out


def count(tree) -> tuple[int, int]:
    """(parameters, bytes) of a tree of arrays (a QTensor counts its stored values and scales)."""
    leaves = jax.tree.leaves(tree)
    return sum(int(x.size) for x in leaves), sum(int(x.size) * x.dtype.itemsize for x in leaves)


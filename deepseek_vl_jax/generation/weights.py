"""The parameters in the layout generation runs on, held once. On CPU with float weights: the decoder's stacked
layers split into one tree per layer (see `llama.apply_layers` for why) whose arrays are views of the stacked ones
(the same memory, no copy), SigLIP's blocks the same way, everything else the model's own parameters. On TPU/GPU,
and on CPU for a quantized decoder (`quantized_decoder`): the model's own parameters, the decoder and SigLIP
scanned over their stacked layers. Either way
a generating model holds its weights once, float or quantized (`QTensor` leaves split like any other: values and
scales).

`split_layers(params, fuse=True)` instead concatenates q/k/v and gate/up into new buffers (`llama.fuse_layer`):
one matrix-vector product instead of three (two), but a second copy of those weights; it is an explicit choice
(benchmarks/bench_generate.py measures both), never the default.

`generation_params` also makes the process give the compiler's freed heap back after each XLA compilation
(`release_heap_after_compiles`): glibc keeps what XLA/LLVM free while compiling (270-350 MB after compiling the
0.45B generate program, benchmarks/bench_quantize.py), which a generating process would otherwise carry as if it
were live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_vl_jax.llama import fuse_layer
from deepseek_vl_jax.quantization.qtensor import QTensor

FUSED_INPUTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
                ("mlp", "up_proj"))


def _layer_sharding(x):
    """The sharding of one layer's slice of a stacked leaf (None off a mesh)."""
    if not isinstance(x.sharding, NamedSharding):
        return None
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    return NamedSharding(x.sharding.mesh, PartitionSpec(*spec[1:]))


def _output_axis_sharded(x) -> bool:
    return isinstance(x.sharding, NamedSharding) and len(x.sharding.spec) == x.ndim and x.sharding.spec[-1] is not None


def can_fuse(stacked) -> bool:
    """True when none of the kernels/biases to be fused has its output axis sharded (tensor parallelism)."""
    return not any(_output_axis_sharded(x) for a, b in FUSED_INPUTS for x in jax.tree.leaves(stacked[a][b]))


def _fuse_shardings(layer: dict) -> dict:
    """`fuse_layer` for a tree of shardings: a fused leaf is sharded as its first part (output axis unsharded)."""
    attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
    attn["qkv_proj"] = attn.pop("q_proj")
    del attn["k_proj"], attn["v_proj"]
    mlp["gate_up_proj"] = mlp.pop("gate_proj")
    del mlp["up_proj"]
    return dict(layer, self_attn=attn, mlp=mlp)


def _split_fused(stacked):
    """One jitted call that slices every stacked leaf into its layers and fuses them (new buffers), each keeping its
    sharding."""
    leaves, treedef = jax.tree.flatten(stacked)
    n = leaves[0].shape[0]
    targets = [_layer_sharding(x) for x in leaves]
    out_shardings = None
    if all(t is not None for t in targets):
        out_shardings = (_fuse_shardings(jax.tree.unflatten(treedef, targets)),) * n
    one = lambda t, i: fuse_layer(jax.tree.map(lambda x: x[i], t))
    return jax.jit(lambda t: tuple(one(t, i) for i in range(n)), out_shardings=out_shardings)(stacked)


def layer_views(x: jax.Array) -> list[jax.Array]:
    """x [L, ...] -> L arrays [...] sharing x's memory, each sharded like its slice of x.

    Each device's shard is read as a numpy view and handed back to the same device; on CPU both steps are
    zero-copy (the arrays alias x's buffers, which they keep alive). Where a runtime cannot alias (another
    platform, an unaligned slice), `device_put` copies: still correct, only the memory is no longer shared.
    The layer axis is never sharded (the rules table maps `layers` to None), so every shard holds all layers."""
    shards = x.addressable_shards
    if any(s.data.shape[0] != x.shape[0] for s in shards):
        raise ValueError("cannot split a stacked parameter whose layer axis is sharded")
    target = _layer_sharding(x) or x.sharding
    hosts = [np.asarray(s.data) for s in shards]
    return [jax.make_array_from_single_device_arrays(
        x.shape[1:], target, [jax.device_put(h[i], s.device) for h, s in zip(hosts, shards)])
        for i in range(x.shape[0])]


def _split_views(stacked) -> tuple:
    leaves, treedef = jax.tree.flatten(stacked)
    per_leaf = [layer_views(x) for x in leaves]
    return tuple(jax.tree.unflatten(treedef, [v[i] for v in per_leaf]) for i in range(leaves[0].shape[0]))


def split_layers(params, fuse: bool = False) -> dict:
    """{"params": params without language_model.layers and vision_model.layers, "layers": (layer 0 tree, layer 1
    tree, ...), "vision_layers": SigLIP's block trees}. The layer trees are views of the stacked arrays
    (`layer_views`), or with `fuse` new buffers with q/k/v and gate/up concatenated (not where tensor parallelism
    shards their output axis); SigLIP's blocks are always views (`siglip.SiglipVisionModel` says why)."""
    lm, vm = params["language_model"], params["vision_model"]
    rest = dict(params, language_model={k: v for k, v in lm.items() if k != "layers"},
                vision_model={k: v for k, v in vm.items() if k != "layers"})
    if fuse and not can_fuse(lm["layers"]):
        raise ValueError("cannot fuse q/k/v or gate/up: their output axis is sharded (tensor parallelism)")
    return {"params": rest, "layers": _split_fused(lm["layers"]) if fuse else _split_views(lm["layers"]),
            "vision_layers": _split_views(vm["layers"])}


def split_on(model) -> bool:
    """Whether generation splits the decoder into per-layer trees: on CPU, where it is much faster for float
    weights (see `llama.apply_layers`). On TPU/GPU the decoder is scanned over the stacked weights, and on CPU too
    when its layers are quantized (`quantized_decoder`)."""
    on_cpu = all(d.platform == "cpu" for d in jax.tree.leaves(model.params)[0].devices())
    return on_cpu and not quantized_decoder(model.params)


def quantized_decoder(params) -> bool:
    """Whether the decoder's stacked layers hold `QTensor`s. XLA:CPU converts each quantized kernel into a float
    temporary before its dot (quantization.ops) and fuses the layer's dynamic slice of the stacked values into
    that conversion, so scanning reads no weight twice (a float kernel the dot would read from a copy of its
    slice); and a scan compiles one layer's kernels instead of one per layer (XLA:CPU keeps ~60-100 KB of runtime
    memory per kernel: benchmarks/bench_quantize.py)."""
    stacked = params.get("language_model", {}).get("layers")
    return stacked is not None and any(isinstance(x, QTensor) for x in jax.tree.leaves(
        stacked, is_leaf=lambda x: isinstance(x, QTensor)))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20


@functools.cache
def release_heap_after_compiles() -> bool:
    """Once per process (glibc only; a no-op elsewhere): allocations of 1 MiB or more are mapped and unmapped
    (`mallopt(M_MMAP_THRESHOLD)`, which also stops glibc from raising that threshold to the largest buffer freed so
    far, up to 32 MiB, so that XLA's and Eigen's freed buffers stayed in the heap), and after every XLA backend
    compilation `malloc_trim(0)` returns the heap pages the compiler freed. Live memory is untouched.
    Returns whether it applied."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return False
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.malloc_trim(0)

    def trim(event: str, *_args, **_kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(trim)
    return True


def generation_params(model) -> dict:
    """`split_layers(model.params)` where `split_on(model)` (cached on the model, recomputed if its params object is
    replaced), else {"params": model.params, "layers": None, "vision_layers": None}. Installs
    `release_heap_after_compiles`."""
    release_heap_after_compiles()
    if not split_on(model):
        return {"params": model.params, "layers": None, "vision_layers": None}
    cached = model.__dict__.get("_generation_params")
    if cached is None or cached[0] is not model.params:
        cached = (model.params, split_layers(model.params))
        model.__dict__["_generation_params"] = cached
    return cached[1]

"""The parameters in the layout generation runs on. On CPU: the decoder's stacked layers split into one tree per
layer (see `llama.apply_layers` for why), with q/k/v and gate/up fused where their output axis is not sharded
(`llama.fuse_layer`), everything else shared with the model's own parameters. On TPU/GPU: the model's own
parameters, the decoder scanned over its stacked layers.

The split layers are new buffers (the model's stacked ones stay, as the full forward uses them), made once per
`Model` and kept on it; with a mesh, each slice keeps its parameter's sharding.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_vl_jax.llama import fuse_layer

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


def _split(stacked, fuse: bool):
    """One jitted call that slices every stacked leaf into its layers (fused if asked), each keeping its sharding."""
    leaves, treedef = jax.tree.flatten(stacked)
    n = leaves[0].shape[0]
    targets = [_layer_sharding(x) for x in leaves]
    out_shardings = None
    if all(t is not None for t in targets):
        per_layer = jax.tree.unflatten(treedef, targets)
        out_shardings = (_fuse_shardings(per_layer) if fuse else per_layer,) * n
    one = lambda t, i: (fuse_layer if fuse else lambda x: x)(jax.tree.map(lambda x: x[i], t))
    return jax.jit(lambda t: tuple(one(t, i) for i in range(n)), out_shardings=out_shardings)(stacked)


def split_layers(params, fuse: bool | None = None) -> dict:
    """{"params": params without language_model.layers, "layers": (layer 0 tree, layer 1 tree, ...)}.
    fuse: concatenate q/k/v and gate/up (None: wherever `can_fuse`)."""
    lm = params["language_model"]
    rest = dict(params, language_model={k: v for k, v in lm.items() if k != "layers"})
    if fuse is None:
        fuse = can_fuse(lm["layers"])
    elif fuse and not can_fuse(lm["layers"]):
        raise ValueError("cannot fuse q/k/v or gate/up: their output axis is sharded (tensor parallelism)")
    return {"params": rest, "layers": _split(lm["layers"], fuse)}


def split_on(model) -> bool:
    """Whether generation splits the decoder into per-layer buffers: on CPU, where it is much faster (see
    `llama.apply_layers`). On TPU/GPU the decoder is scanned over the stacked weights: no second copy of them."""
    return all(d.platform == "cpu" for d in jax.tree.leaves(model.params)[0].devices())


def generation_params(model) -> dict:
    """`split_layers(model.params)` where `split_on(model)` (cached on the model, recomputed if its params object is
    replaced), else {"params": model.params, "layers": None}."""
    if not split_on(model):
        return {"params": model.params, "layers": None}
    cached = model.__dict__.get("_generation_params")
    if cached is None or cached[0] is not model.params:
        cached = (model.params, split_layers(model.params))
        model.__dict__["_generation_params"] = cached
    return cached[1]

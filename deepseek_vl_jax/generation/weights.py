"""The parameters in the layout generation runs on: the decoder's stacked layers split into one tree per layer
(see `llama.apply_layers` for why), everything else shared with the model's own parameters.

The split layers are new buffers (the model's stacked ones stay, as the full forward uses them), made once per
`Model` and kept on it; with a mesh, each slice keeps its parameter's sharding.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def _unstack(stacked):
    """One jitted call that slices every stacked leaf into its layers (each slice keeps the leaf's sharding)."""
    leaves, treedef = jax.tree.flatten(stacked)
    n = leaves[0].shape[0]

    def target(x):
        if not isinstance(x.sharding, NamedSharding):
            return None
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        return NamedSharding(x.sharding.mesh, PartitionSpec(*spec[1:]))

    targets = [target(x) for x in leaves]
    out_shardings = None if any(t is None for t in targets) else tuple(tuple(targets) for _ in range(n))
    split = jax.jit(lambda xs: tuple(tuple(x[i] for x in xs) for i in range(n)), out_shardings=out_shardings)
    return tuple(jax.tree.unflatten(treedef, layer) for layer in split(leaves))


def split_layers(params) -> dict:
    """{"params": params without language_model.layers, "layers": (layer 0 tree, layer 1 tree, ...)}."""
    lm = params["language_model"]
    rest = dict(params, language_model={k: v for k, v in lm.items() if k != "layers"})
    return {"params": rest, "layers": _unstack(lm["layers"])}


def generation_params(model) -> dict:
    """`split_layers(model.params)`, cached on the model (recomputed if its params object is replaced)."""
    cached = model.__dict__.get("_generation_params")
    if cached is None or cached[0] is not model.params:
        cached = (model.params, split_layers(model.params))
        model.__dict__["_generation_params"] = cached
    return cached[1]

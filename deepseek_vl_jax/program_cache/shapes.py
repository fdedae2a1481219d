"""The boxed abstract parameters of a model config (`pretrained.abstract_params`: shapes, dtypes and logical axis
names, found by tracing the model's `init`, ~1 s), kept as JSON so a repeat load skips the trace."""

from __future__ import annotations

import json

from deepseek_vl_jax.program_cache.store import COUNTS, Store

SUFFIX = ".shapes.json"


def to_json(abstract) -> dict:
    """{name: subtree or {"shape", "dtype", "names"}} of a boxed abstract tree (names None for an unboxed leaf)."""
    from flax import linen as nn

    if isinstance(abstract, dict):
        return {k: to_json(v) for k, v in abstract.items()}
    boxed = isinstance(abstract, nn.LogicallyPartitioned)
    if boxed and (abstract.mesh is not None or abstract.rules is not None):
        raise TypeError("a box bound to a mesh or rules is not cached")
    value = abstract.value if boxed else abstract
    return {"shape": list(value.shape), "dtype": str(value.dtype),
            "names": list(abstract.names) if boxed else None}


def from_json(tree: dict):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    if set(tree) == {"shape", "dtype", "names"} and isinstance(tree["shape"], list):
        value = jax.ShapeDtypeStruct(tuple(tree["shape"]), jnp.dtype(tree["dtype"]))
        return value if tree["names"] is None else nn.LogicallyPartitioned(value, tuple(tree["names"]))
    return {k: from_json(v) for k, v in tree.items()}


def abstract_params(store: Store, config):
    """`pretrained.abstract_params(config)` from the store, or traced and stored."""
    from deepseek_vl_jax import pretrained

    key = store.key("abstract_params", config=repr(config))
    data = store.read(key, SUFFIX)
    if data is not None:
        try:
            tree = from_json(json.loads(data))
            COUNTS["shapes_loaded"] += 1
            return tree
        except (ValueError, TypeError, KeyError, AttributeError):
            COUNTS["rejected"] += 1
    abstract = pretrained.abstract_params(config)
    try:
        payload = json.dumps(to_json(abstract)).encode()
    except (TypeError, AttributeError):
        return abstract
    if store.write(key, SUFFIX, payload):
        COUNTS["shapes_saved"] += 1
    return abstract

"""One rules table from logical axis names to mesh axes, and the helpers that turn it into shardings.

Moving between data-parallel, FSDP and tensor-parallel layouts is an edit of `RULES` (or of the mesh's sizes),
never of the model. A mesh always has the axes ("data", "fsdp", "tensor"); a size of 1 switches one off.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_vl_jax import common as c

# logical axis -> mesh axis (or axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (c.BATCH, (c.DATA, c.FSDP)),
    (c.LENGTH, None),
    (c.EMBED, c.FSDP),
    (c.MLP, c.TENSOR),
    (c.HEADS, c.TENSOR),
    (c.KV_HEADS, c.TENSOR),
    (c.VOCAB, c.TENSOR),
    (c.LAYERS, None),
    (c.NORM, None),
    (c.CONV_SPATIAL, None),
    (c.CONV_IN, None),
    (c.CONV_OUT, c.TENSOR),
    (c.POSITIONS, None),
    (c.REL_POS, None),
    (c.SCALAR, None),
    (c.LORA_RANK, None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(c.MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), c.MESH_AXES)


def _fits(mesh: Mesh, axis, dim: int) -> bool:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    return dim % math.prod(mesh.shape[a] for a in names) == 0


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules=RULES) -> PartitionSpec:
    """PartitionSpec for one array: each logical axis through the rules; a dimension that the mesh axes do not
    divide evenly (e.g. 2 kv heads on 4-way tensor parallelism) is replicated instead; a mesh axis is used once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axis = table.get(name) if name is not None else None
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if names and _fits(mesh, names, dim):
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return PartitionSpec(*out)


def param_shardings(abstract_params, mesh: Mesh, rules=RULES):
    """NamedShardings for a tree of (boxed, from `jax.eval_shape(module.init)`) parameters."""
    logical = nn.get_partition_spec(abstract_params)
    shapes = nn.meta.unbox(abstract_params)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, spec_for(tuple(spec), x.shape, mesh, rules)),
        logical, shapes, is_leaf=lambda s: isinstance(s, PartitionSpec))


def logical_axes(abstract_params):
    """The logical axis names of each parameter (a tree of PartitionSpec of logical names)."""
    return nn.get_partition_spec(abstract_params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over data x fsdp, replicate the rest."""
    return NamedSharding(mesh, PartitionSpec((c.DATA, c.FSDP), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules(mesh: Mesh, rules=RULES):
    """flax logical-axis-rules context for activation constraints inside jit (pass with `with mesh:`)."""
    filtered = []
    for name, axis in rules:
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        names = tuple(a for a in names if mesh.shape[a] > 1)
        filtered.append((name, names[0] if len(names) == 1 else (names or None)))
    return nn.logical_axis_rules(filtered)

"""Which parameters are quantized, how (`QuantizeConfig`, `plan`), and the quantized tree's shapes, shardings and
checkpoint layout.

Selected by path over an unchanged model: the decoder's Dense kernels (q/k/v/o, gate/up/down) always; the LM head,
the token embeddings (int8 per row, for either scheme: the lookup and the tied LM head read whole rows) and the
vision towers + aligner (their Dense kernels; convolutions stay float) when asked. Norms, biases and every other
parameter stay in the float dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from flax.core import meta
from jax.sharding import Mesh, NamedSharding

from deepseek_vl_jax import common, hf_mapping, sharding
from deepseek_vl_jax.quantization.qtensor import (
    DEFAULT_GROUP_SIZE, QTensor, QuantizationError, Scheme, _groups, quantize, scheme_of)

EMBEDDING = ("language_model", "embed_tokens", "embedding")
LM_HEAD = ("language_model", "lm_head", "kernel")
# In a checkpoint a quantized leaf is a dict of these two arrays.
VALUES, SCALES = "q_values", "q_scales"


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """scheme: "int8" (per output channel) or "int4" (per group of `group_size` input rows).
    lm_head / embeddings / vision: also quantize the untied LM head, the token embeddings, the vision towers and
    aligner (the decoder's linear layers are always quantized)."""

    scheme: Scheme = Scheme.INT8
    group_size: int = DEFAULT_GROUP_SIZE
    lm_head: bool = False
    embeddings: bool = False
    vision: bool = False

    def __post_init__(self):
        object.__setattr__(self, "scheme", scheme_of(self.scheme))
        if self.scheme == Scheme.INT4 and (self.group_size <= 0 or self.group_size % 2):
            raise QuantizationError(f"int4 group size must be a positive even number, got {self.group_size}")

    @classmethod
    def create(cls, spec) -> "QuantizeConfig | None":
        """None, a scheme name, a dict of fields (as stored in a checkpoint marker) or a QuantizeConfig."""
        if spec is None or isinstance(spec, QuantizeConfig):
            return spec
        if isinstance(spec, (str, Scheme)):
            return cls(scheme_of(spec))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise QuantizationError(f"unknown quantization settings {sorted(unknown)}")
            return cls(**spec)
        raise QuantizationError(f"quantize must be None, a scheme ({', '.join(s.value for s in Scheme)}) or a "
                                f"QuantizeConfig, got {spec!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "scheme": self.scheme.value}


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter is quantized: scheme, group size (int4), reduced axis (negative)."""

    scheme: Scheme
    group_size: int
    axis: int


def _dense_kernel(path: tuple[str, ...], logical: tuple) -> bool:
    dims = len(logical) - (1 if logical and logical[0] == common.LAYERS else 0)
    return path[-1] == "kernel" and dims == 2


def plan(abstract_params, qconfig: QuantizeConfig) -> dict[tuple[str, ...], LeafPlan]:
    """{flat path: LeafPlan} of the parameters `qconfig` quantizes, from the boxed abstract params (logical axes).
    Raises QuantizationError (naming the tensor) where a group size does not divide an input width."""
    logical = dict(hf_mapping._flatten(jax.tree.map(tuple, sharding.logical_axes(abstract_params),
                                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))
    shapes = dict(hf_mapping._flatten(meta.unbox(abstract_params)))
    out = {}
    for path, shape in shapes.items():
        shape = tuple(shape.shape)
        if path == EMBEDDING:
            if qconfig.embeddings:
                out[path] = LeafPlan(Scheme.INT8, 0, -1)
            continue
        if not _dense_kernel(path, logical[path]):
            continue
        if path[0] == "language_model":
            wanted = path[1] == "layers" or (path == LM_HEAD and qconfig.lm_head)
        else:
            wanted = qconfig.vision
        if wanted:
            _groups(shape[-2], qconfig.scheme, qconfig.group_size, "/".join(path))
            out[path] = LeafPlan(qconfig.scheme, qconfig.group_size if qconfig.scheme == Scheme.INT4 else 0, -2)
    return out


def quantize_leaf(array, leaf: LeafPlan, scale_dtype, path: tuple[str, ...] = ()) -> QTensor:
    """Quantize one loaded parameter (numpy) by its plan; numpy QTensor."""
    return quantize(array, leaf.scheme, leaf.group_size or DEFAULT_GROUP_SIZE, leaf.axis, scale_dtype,
                    "/".join(path))


def leaf_shapes(shape: tuple[int, ...], leaf: LeafPlan) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]:
    """(values shape, values dtype, scales shape) of a quantized parameter of float `shape`."""
    a = leaf.axis % len(shape)
    values = list(shape)
    scales = list(shape)
    if leaf.scheme == Scheme.INT4:
        values[a] //= 2
        scales[a] = shape[a] // leaf.group_size
        return tuple(values), np.dtype(np.uint8), tuple(scales)
    scales[a] = 1
    return tuple(values), np.dtype(np.int8), tuple(scales)


def abstract_quantized(shapes, leaves: Mapping[tuple[str, ...], LeafPlan], scale_dtype, float_dtype,
                       shardings=None):
    """The quantized param tree as ShapeDtypeStructs (QTensor where planned, float_dtype elsewhere);
    shardings: a matching tree from `shardings_for` (or None)."""
    flat_sh = dict(hf_mapping._flatten(shardings)) if shardings is not None else {}
    out: dict = {}
    for path, s in hf_mapping._flatten(shapes):
        sh = flat_sh.get(path)
        if path in leaves:
            leaf = leaves[path]
            vshape, vdtype, sshape = leaf_shapes(tuple(s.shape), leaf)
            value = QTensor(jax.ShapeDtypeStruct(vshape, vdtype, sharding=sh.values if sh else None),
                            jax.ShapeDtypeStruct(sshape, scale_dtype, sharding=sh.scales if sh else None),
                            leaf.scheme, leaf.group_size, leaf.axis)
        else:
            value = jax.ShapeDtypeStruct(tuple(s.shape), float_dtype, sharding=sh)
        hf_mapping.set_path(out, path, value)
    return out


def shardings_for(abstract_params, leaves: Mapping[tuple[str, ...], LeafPlan], mesh: Mesh):
    """NamedShardings for the quantized tree: values like their float parameter (by the rules table, on the values'
    own shape), scales on the same logical axes (the reduced axis replicated when it has one scale per channel)."""
    float_sh = sharding.param_shardings(abstract_params, mesh)
    logical = dict(hf_mapping._flatten(jax.tree.map(tuple, sharding.logical_axes(abstract_params),
                                                    is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))
    shapes = dict(hf_mapping._flatten(meta.unbox(abstract_params)))
    out: dict = {}
    for path, sh in hf_mapping._flatten(float_sh):
        if path in leaves:
            leaf, names = leaves[path], list(logical[path])
            vshape, _, sshape = leaf_shapes(tuple(shapes[path].shape), leaf)
            a = leaf.axis % len(vshape)
            snames = list(names)
            if sshape[a] == 1:
                snames[a] = None
            sh = QTensor(NamedSharding(mesh, sharding.spec_for(names, vshape, mesh)),
                         NamedSharding(mesh, sharding.spec_for(snames, sshape, mesh)),
                         leaf.scheme, leaf.group_size, leaf.axis)
        hf_mapping.set_path(out, path, sh)
    return out


def quantize_params(params, abstract_params, quantize, scale_dtype, mesh: Mesh | None = None) -> dict:
    """Quantize an in-memory float param tree (nested dict of arrays) by `quantize` (a scheme, dict or
    QuantizeConfig), one tensor at a time through host memory; the rest is kept as it is. With `mesh`, the
    quantized leaves are placed by `shardings_for`."""
    qconfig = QuantizeConfig.create(quantize)
    leaves = plan(abstract_params, qconfig)
    shardings = dict(hf_mapping._flatten(shardings_for(abstract_params, leaves, mesh))) if mesh is not None else {}
    out: dict = {}
    for path, x in hf_mapping._flatten(params):
        if path in leaves:
            qt = quantize_leaf(np.asarray(x), leaves[path], scale_dtype, path)
            sh = shardings.get(path)
            put = lambda a, s: jax.device_put(a, s) if s is not None else jax.numpy.asarray(a)
            x = qt.replace(values=put(qt.values, sh and sh.values), scales=put(qt.scales, sh and sh.scales))
        hf_mapping.set_path(out, path, x)
    return out


def to_checkpoint_tree(params) -> dict:
    """QTensor leaves -> {q_values, q_scales} dicts (a plain nested dict of arrays, what Orbax stores)."""
    out: dict = {}
    for path, x in hf_mapping._flatten(params):
        if isinstance(x, QTensor):
            hf_mapping.set_path(out, path + (VALUES,), x.values)
            hf_mapping.set_path(out, path + (SCALES,), x.scales)
        else:
            hf_mapping.set_path(out, path, x)
    return out


def from_checkpoint_tree(tree, leaves: Mapping[tuple[str, ...], LeafPlan]) -> dict:
    """The inverse of `to_checkpoint_tree` for the planned leaves."""
    out: dict = {}
    for path, x in hf_mapping._flatten(tree):
        if path[:-1] in leaves and path[-1] in (VALUES, SCALES):
            continue
        hf_mapping.set_path(out, path, x)
    for path, leaf in leaves.items():
        node = tree
        for k in path:
            node = node[k]
        hf_mapping.set_path(out, path, QTensor(node[VALUES], node[SCALES], leaf.scheme, leaf.group_size, leaf.axis))
    return out


def is_quantized(params) -> bool:
    return any(isinstance(x, QTensor) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QTensor)))


def nbytes(params, only: tuple[str, ...] | None = None) -> int:
    """Bytes of a (quantized or float) param tree of arrays or ShapeDtypeStructs; `only`: a path prefix."""
    total = 0
    for path, x in hf_mapping._flatten(params):
        if only is not None and path[:len(only)] != only:
            continue
        for a in (x.values, x.scales) if isinstance(x, QTensor) else (x,):
            total += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def describe(params) -> dict[str, Any]:
    """{path: scheme} of the quantized leaves (for messages and tests)."""
    return {"/".join(p): x.scheme.value for p, x in hf_mapping._flatten(params) if isinstance(x, QTensor)}

"""Quantized Flax checkpoints: the marker's `quantization` entry, and restoring with or without quantizing.

A quantized checkpoint stores each quantized parameter as two arrays, `<path>/q_values` (int8, or uint8 holding
two int4) and `<path>/q_scales`, sharded like their parameter on restore; the marker records the settings
(`QuantizeConfig.to_dict()`), so `load_pretrained(DST)` restores it as stored, without re-quantizing.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax.core import meta

from deepseek_vl_jax import common, hf_mapping
from deepseek_vl_jax.quantization.params import (
    SCALES, VALUES, QuantizeConfig, abstract_quantized, from_checkpoint_tree, plan, quantize_leaf, shardings_for,
    to_checkpoint_tree)
from deepseek_vl_jax.quantization.qtensor import QTensor, QuantizationError, dequantize

MARKER_KEY = "quantization"


def stored_config(marker: dict | None) -> QuantizeConfig | None:
    """The settings a checkpoint marker records, or None for a float checkpoint."""
    entry = (marker or {}).get(MARKER_KEY)
    return None if entry is None else QuantizeConfig.create(entry)


def choose(stored: QuantizeConfig | None, requested, where: str) -> QuantizeConfig | None:
    """The settings to load with: the stored ones (a different request is an error), else the requested ones."""
    requested = QuantizeConfig.create(requested)
    if stored is not None and requested is not None and requested != stored:
        raise QuantizationError(
            f"{where} is already quantized ({_describe(stored)}); the requested quantization ({_describe(requested)}) "
            "conflicts: load it without --quantize, or quantize the float checkpoint it came from")
    return stored or requested


def _describe(q: QuantizeConfig) -> str:
    extra = [k for k in ("lm_head", "embeddings", "vision") if getattr(q, k)]
    group = f", group size {q.group_size}" if q.scheme.value == "int4" else ""
    return f"{q.scheme.value}{group}" + (f", also {'/'.join(extra)}" if extra else "")


def _shardings(boxed, leaves, mesh):
    if mesh is not None:
        return shardings_for(boxed, leaves, mesh)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    from deepseek_vl_jax.quantization.qtensor import QTensor
    tree: dict = {}
    for path, _ in hf_mapping._flatten(meta.unbox(boxed)):
        hf_mapping.set_path(tree, path, QTensor(one, one, leaves[path].scheme, leaves[path].group_size,
                                                leaves[path].axis) if path in leaves else one)
    return tree


def restore(params_dir: str, boxed, qconfig: QuantizeConfig, stored: bool, dtype, scale_dtype, mesh=None):
    """Restore a Flax checkpoint's params into a quantized tree. stored: the checkpoint holds quantized leaves
    (restored as they are, scales cast to `scale_dtype`); else float leaves, each quantized as it is read."""
    from deepseek_vl_jax.conversion import flax_checkpoint, orbax_io

    leaves = plan(boxed, qconfig)
    shapes = meta.unbox(boxed)
    dtype, scale_dtype = common.to_dtype(dtype), common.to_dtype(scale_dtype)
    target = abstract_quantized(shapes, leaves, scale_dtype, dtype, _shardings(boxed, leaves, mesh))
    on_disk = orbax_io.leaf_metadata(params_dir)
    if stored:
        expected = {k: tuple(v.shape) for k, v in hf_mapping._flatten(to_checkpoint_tree(target))}
        flax_checkpoint.check_tree(expected, {k: s for k, (s, _) in on_disk.items()}, f"checkpoint {params_dir}")
        return from_checkpoint_tree(orbax_io.restore_pytree(params_dir, to_checkpoint_tree(target)), leaves)
    flax_checkpoint.check_tree({k: tuple(v.shape) for k, v in hf_mapping._flatten(shapes)},
                               {k: s for k, (s, _) in on_disk.items()}, f"checkpoint {params_dir}")
    flat_target = dict(hf_mapping._flatten(target))
    rest = [p for p in flat_target if p not in leaves]
    out: dict = {}
    for path, array in orbax_io.restore_leaves_numpy(params_dir, rest).items():
        t = flat_target[path]
        hf_mapping.set_path(out, path, _put(array.astype(dtype), t.sharding))
    for path in leaves:  # one tensor at a time: read, quantize, place, drop
        array = orbax_io.restore_leaves_numpy(params_dir, [path])[path].astype(dtype)
        qt = quantize_leaf(array, leaves[path], scale_dtype, path)
        del array
        t = flat_target[path]
        hf_mapping.set_path(out, path, qt.replace(values=_put(qt.values, t.values.sharding),
                                                  scales=_put(qt.scales, t.scales.sharding)))
    return out


def _put(array: np.ndarray, target):
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def template_shapes(boxed, qconfig: QuantizeConfig, scale_dtype) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{checkpoint path: shape} of the quantized tree (what `convert --quantize` writes)."""
    leaves = plan(boxed, qconfig)
    target = abstract_quantized(meta.unbox(boxed), leaves, common.to_dtype(scale_dtype), np.float32)
    return {k: tuple(v.shape) for k, v in hf_mapping._flatten(to_checkpoint_tree(target))}


@dataclasses.dataclass(frozen=True)
class DequantizedView:
    """A quantized checkpoint's leaves as `conversion.export` reads them (a float tree): `shapes` {path: (shape,
    dtype)}, `sources` {path: the stored leaves it is made from}, `build(path, restored)` makes one leaf, a
    quantized one dequantized (values x scales, in the scales' dtype: the stored float dtype)."""

    shapes: dict
    sources: dict
    leaves: dict  # {path: LeafPlan} of the quantized parameters

    def build(self, path, restored: dict) -> np.ndarray:
        if path not in self.leaves:
            return restored.pop(path)
        values, scales = restored.pop(path + (VALUES,)), restored.pop(path + (SCALES,))
        leaf = self.leaves[path]
        qt = QTensor(values, scales, leaf.scheme, leaf.group_size, leaf.axis)
        return np.asarray(dequantize(qt, scales.dtype))


def dequantized_view(stored: dict, boxed, qconfig: QuantizeConfig) -> DequantizedView:
    """The DequantizedView of a quantized checkpoint's stored leaves {path: (shape, dtype)}; `boxed`: the model's
    abstract parameters (their float shapes), `qconfig`: the settings its marker records."""
    leaves = plan(boxed, qconfig)
    float_shapes = dict(hf_mapping._flatten(meta.unbox(boxed)))
    shapes, sources = {}, {}
    for path, (shape, dtype) in stored.items():
        if path[:-1] in leaves and path[-1] in (VALUES, SCALES):
            if path[-1] == SCALES:
                shapes[path[:-1]] = (tuple(float_shapes[path[:-1]].shape), np.dtype(dtype))
                sources[path[:-1]] = [path[:-1] + (VALUES,), path]
            continue
        shapes[path], sources[path] = (tuple(shape), np.dtype(dtype)), [path]
    return DequantizedView(shapes, sources, leaves)


__all__ = ["MARKER_KEY", "DequantizedView", "choose", "dequantized_view", "restore", "stored_config",
           "template_shapes"]

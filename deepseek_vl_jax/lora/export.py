"""`export OUT DST --merge | --adapter` for LoRA training outputs: the adapters folded into the base (a plain HF
checkpoint that transformers loads), or a PEFT adapter directory (adapters + fully trained towers).

The run's LoRA setting and trainable towers come from `OUT/train_config.json`. Neither restores the whole tree:
`--adapter` reads only the adapters and trained towers; `--merge` streams through `conversion.export`, each base
leaf read with its adapter pair, folded (a QLoRA base dequantized to float32) and written before the next.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from deepseek_vl_jax import hf_mapping, quantization
from deepseek_vl_jax.conversion import atomic, flax_checkpoint, orbax_io
from deepseek_vl_jax.lora import adapters as A
from deepseek_vl_jax.lora import peft_io
from deepseek_vl_jax.lora.config import LoraConfig

TRAIN_CONFIG = "train_config.json"


def is_lora_checkpoint(source: flax_checkpoint.FlaxSource) -> bool:
    return any(path[0] == A.ADAPTERS for path in orbax_io.leaf_metadata(source.params_dir))


def _run(src, step):
    source = flax_checkpoint.resolve(src, step)
    if not is_lora_checkpoint(source):
        raise ValueError(f"{source.params_dir} holds no LoRA adapters; export it without --merge / --adapter")
    path = os.path.join(source.root, TRAIN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source.root}: no {TRAIN_CONFIG} (the LoRA rank and alpha of the run)")
    with open(path) as f:
        train_config = json.load(f)
    from deepseek_vl_jax.training.config import TrainConfig, from_dict

    return source, from_dict(TrainConfig, train_config)


def _restore(source, paths) -> dict:
    """The stored leaves `paths` as a nested dict of numpy arrays, quantized ones as QTensors."""
    leaves = orbax_io.restore_leaves_numpy(source.params_dir, paths)
    tree: dict = {}
    for p, x in leaves.items():
        hf_mapping.set_path(tree, p, x)
    return quantization.from_checkpoint_tree(tree, _stored_plan(leaves))


def _stored_plan(leaves: dict) -> dict:
    """{path: LeafPlan} of a QLoRA base's quantized leaves, read off the stored arrays (`q_values` uint8: int4,
    its group size = inputs / scales; int8 per channel; embeddings are quantized along their last axis)."""
    out = {}
    for path, values in leaves.items():
        if path[-1] != quantization.params.VALUES:
            continue
        path = path[:-1]
        axis = -1 if path[-1] == "embedding" else -2
        scales = leaves[path + (quantization.params.SCALES,)]
        if values.dtype == np.uint8:
            out[path] = quantization.LeafPlan(quantization.Scheme.INT4, 2 * values.shape[axis] // scales.shape[axis],
                                              axis)
        else:
            out[path] = quantization.LeafPlan(quantization.Scheme.INT8, 0, axis)
    return out


def export_adapter(src: str | os.PathLike, dst: str | os.PathLike, step: int | None = None,
                   force: bool = False) -> list[str]:
    """A PEFT adapter directory from a LoRA training output (latest step, or `step`); reads only the adapters and
    the trained towers."""
    source, config = _run(src, step)
    stored = orbax_io.leaf_metadata(source.params_dir)
    towers = tuple(t for t in config.trainable.collections() if any(p[0] == t for p in stored))
    params = _restore(source, [p for p in stored if p[0] in (A.ADAPTERS, *towers)])
    dst = os.path.abspath(os.fspath(dst))
    atomic.check_destination(dst, force)
    with atomic.staged_directory(dst, force) as tmp:
        peft_io.save_adapter(tmp, params, config.lora, towers, base_model=None)
    return [os.path.join(dst, peft_io.ADAPTER_WEIGHTS)]


@dataclasses.dataclass(frozen=True)
class MergedView:
    """The merged model's leaves as `conversion.export` reads them: `shapes` {path: (shape, dtype)} of the plain
    tree, `sources` {path: the stored leaves it is made from}, `build(path, restored)` makes one leaf."""

    shapes: dict
    sources: dict
    config: LoraConfig

    def build(self, path, restored: dict) -> np.ndarray:
        base = path[:-1]
        stored = path + (quantization.params.VALUES,), path + (quantization.params.SCALES,)
        if stored[0] in self.sources[path]:  # a QLoRA base kernel: dequantized
            values, scales = (restored.pop(p) for p in stored)
            plan = _stored_plan(dict(zip(stored, (values, scales))))[path]
            kernel = np.asarray(quantization.dequantize(
                quantization.QTensor(values, scales, plan.scheme, plan.group_size, plan.axis), np.float32))
        else:
            kernel = restored.pop(path)
        pair = (A.ADAPTERS, *base)
        if pair + (A.LORA_A,) not in self.sources[path]:
            return kernel
        a, b = (restored.pop(pair + (k,)).astype(np.float32) for k in (A.LORA_A, A.LORA_B))
        delta = np.einsum("...ir,...ro->...io", a, b)
        return (kernel.astype(np.float32) + self.config.scale * delta).astype(kernel.dtype)


def merged_view(stored: dict, config: LoraConfig) -> MergedView:
    """The MergedView of a LoRA checkpoint's stored leaves {path: (shape, dtype)}."""
    values, scales = quantization.params.VALUES, quantization.params.SCALES
    shapes, sources = {}, {}
    for path, (shape, dtype) in stored.items():
        if path[0] == A.ADAPTERS or path[-1] == scales:
            continue
        if path[-1] == values:
            kernel = path[:-1]
            qshape = stored[kernel + (scales,)][0]
            plan = _stored_plan({path: _Spec(shape, dtype),
                                 kernel + (scales,): _Spec(qshape, np.float32)})[kernel]
            full = list(shape)
            if plan.scheme == quantization.Scheme.INT4:
                full[plan.axis] *= 2
            shapes[kernel] = (tuple(full), np.dtype(np.float32))
            sources[kernel] = [path, kernel + (scales,)]
            path = kernel
        else:
            shapes[path] = (shape, dtype)
            sources[path] = [path]
        pair = (A.ADAPTERS, *path[:-1])
        if pair + (A.LORA_A,) in stored:
            sources[path] += [pair + (A.LORA_A,), pair + (A.LORA_B,)]
    return MergedView(shapes, sources, config)


class _Spec:
    """shape and dtype of a stored leaf (what `_stored_plan` reads)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


def export_merged(src: str | os.PathLike, dst: str | os.PathLike, step: int | None = None, force: bool = False,
                  **export_kw) -> list[str]:
    """A plain HF checkpoint with the adapters folded in, written leaf by leaf by `conversion.export`."""
    from deepseek_vl_jax.conversion.export import export

    source, config = _run(src, step)
    view = merged_view(flax_checkpoint.stored_leaves(source), config.lora)
    return export(src, dst, step=step, force=force, merge=view, **export_kw)

"""`export OUT DST --merge | --adapter` for LoRA training outputs: the adapters folded into the base (a plain HF
checkpoint that transformers loads), or a PEFT adapter directory (adapters + fully trained towers).

The run's LoRA setting and trainable towers come from `OUT/train_config.json`. The params are restored whole
(host memory about the size of the model: fine up to the 7B in float32 on a training host); a QLoRA base is
restored as its QTensors and dequantized (float32) by `--merge`.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import numpy as np

from deepseek_vl_jax import hf_mapping, quantization
from deepseek_vl_jax.conversion import atomic, flax_checkpoint, orbax_io
from deepseek_vl_jax.lora import adapters as A
from deepseek_vl_jax.lora import peft_io
from deepseek_vl_jax.lora.config import LoraConfig

TRAIN_CONFIG = "train_config.json"


def is_lora_checkpoint(source: flax_checkpoint.FlaxSource) -> bool:
    return any(path[0] == A.ADAPTERS for path in orbax_io.leaf_metadata(source.params_dir))


def _restore(src, step):
    source = flax_checkpoint.resolve(src, step)
    if not is_lora_checkpoint(source):
        raise ValueError(f"{source.params_dir} holds no LoRA adapters; export it without --merge / --adapter")
    path = os.path.join(source.root, TRAIN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source.root}: no {TRAIN_CONFIG} (the LoRA rank and alpha of the run)")
    with open(path) as f:
        train_config = json.load(f)
    from deepseek_vl_jax.training.config import TrainConfig, from_dict

    config = from_dict(TrainConfig, train_config)
    leaves = orbax_io.restore_leaves_numpy(source.params_dir, list(orbax_io.leaf_metadata(source.params_dir)))
    tree: dict = {}
    for p, x in leaves.items():
        hf_mapping.set_path(tree, p, x)
    return source, quantization.from_checkpoint_tree(tree, _stored_plan(leaves)), config


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
    """A PEFT adapter directory from a LoRA training output (latest step, or `step`)."""
    source, params, config = _restore(src, step)
    towers = tuple(t for t in config.trainable.collections() if t in params)
    dst = os.path.abspath(os.fspath(dst))
    atomic.check_destination(dst, force)
    with atomic.staged_directory(dst, force) as tmp:
        peft_io.save_adapter(tmp, params, config.lora, towers, base_model=None)
    return [os.path.join(dst, peft_io.ADAPTER_WEIGHTS)]


def merged_params(params: dict, config: LoraConfig) -> dict:
    with jax.default_device(jax.devices("cpu")[0]):
        return jax.tree.map(np.asarray, A.merge(params, config))


def export_merged(src: str | os.PathLike, dst: str | os.PathLike, step: int | None = None, force: bool = False,
                  **export_kw) -> list[str]:
    """A plain HF checkpoint with the adapters folded in (via a temporary Flax checkpoint and `export`)."""
    from deepseek_vl_jax.conversion.export import export

    source, params, config = _restore(src, step)
    merged = merged_params(params, config.lora)
    config_dict = flax_checkpoint.read_config_dict(source)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(os.fspath(dst)))) as tmp:
        flax_checkpoint.write_into(tmp, config_dict, merged, source.root, selective=True)
        return export(tmp, dst, force=force, **export_kw)

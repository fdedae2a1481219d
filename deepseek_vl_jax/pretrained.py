"""`load_pretrained`: an HF checkpoint directory -> a ready, jitted `Model`, tensor by tensor onto devices."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh

from deepseek_vl_jax import common, hf_mapping, multimodal, sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.safetensors_io import CheckpointReader


def dummy_inputs(config: ModelConfig, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs that reach every parameter (one image per row)."""
    v = config.vision
    out = {
        "input_ids": jax.ShapeDtypeStruct((batch, config.num_image_tokens + 1), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((batch, config.num_image_tokens + 1), jnp.int32),
        "pixel_values": jax.ShapeDtypeStruct((batch, v.num_channels, v.image_size, v.image_size), jnp.float32),
    }
    if config.is_hybrid:
        h = config.high_res
        out["high_res_pixel_values"] = jax.ShapeDtypeStruct(
            (batch, h.num_channels, h.image_size, h.image_size), jnp.float32)
    return out


def abstract_params(config: ModelConfig):
    """The boxed (logically partitioned) parameter shapes, allocating nothing."""
    module = DeepseekVL(config)
    variables = jax.eval_shape(lambda rng, inputs: module.init(rng, **inputs), jax.random.key(0),
                               dummy_inputs(config))
    return variables["params"]


def init_params(config: ModelConfig, rng: jax.Array, mesh: Mesh | None = None):
    """Random parameters, created already sharded when a mesh is given."""
    module = DeepseekVL(config)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in dummy_inputs(config).items()}

    def init(rng):
        return meta.unbox(module.init(rng, **zeros)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    shardings = sharding.param_shardings(abstract_params(config), mesh)
    return jax.jit(init, out_shardings=shardings)(rng)


@dataclasses.dataclass
class Model:
    """A loaded model: `.config`, `.params`, the Flax `.module`, and the mesh the params live on (or None).

    Calling it runs the jitted full forward and returns logits [B, T, V] (float32).
    """

    config: ModelConfig
    params: Any
    mesh: Mesh | None = None

    @functools.cached_property
    def module(self) -> DeepseekVL:
        return DeepseekVL(self.config)

    @functools.cached_property
    def _forward(self):
        def forward(params, input_ids, attention_mask, pixel_values, high_res_pixel_values):
            return self.module.apply({"params": params}, input_ids, attention_mask, pixel_values,
                                     high_res_pixel_values)
        return jax.jit(forward)

    def check_inputs(self, input_ids, pixel_values=None, high_res_pixel_values=None) -> None:
        """Host-side validation with clear errors (shapes, image counts, hybrid inputs)."""
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
        n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
        if pixel_values is not None:
            v = c.vision
            want = (v.num_channels, v.image_size, v.image_size)
            if tuple(np.shape(pixel_values)[1:]) != want:
                raise ValueError(f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}] (channels "
                                 f"first), got {tuple(np.shape(pixel_values))}")
        if c.is_hybrid and pixel_values is not None:
            if high_res_pixel_values is None:
                raise ValueError("the hybrid model needs high_res_pixel_values along with pixel_values")
            h = c.high_res
            want = (n_images, h.num_channels, h.image_size, h.image_size)
            if tuple(np.shape(high_res_pixel_values)) != want:
                raise ValueError(f"high_res_pixel_values must be {want}, got {tuple(np.shape(high_res_pixel_values))}")
        multimodal.check_image_tokens(ids, n_images, c.num_image_tokens, c.image_token_id)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, high_res_pixel_values=None) -> jax.Array:
        self.check_inputs(input_ids, pixel_values, high_res_pixel_values)
        if attention_mask is None:
            attention_mask = np.ones(np.shape(input_ids), np.int32)
        args = [jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32),
                None if high_res_pixel_values is None or pixel_values is None
                else jnp.asarray(high_res_pixel_values, jnp.float32)]
        if self.mesh is None:
            return self._forward(self.params, *args)
        with jax.set_mesh(self.mesh), sharding.axis_rules(self.mesh):
            return self._forward(self.params, *args)


def _put(array: np.ndarray, target: jax.sharding.Sharding | None):
    if target is None:
        return jnp.asarray(array)
    # Each process builds only the shards it holds: works unchanged on multi-host meshes.
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None,
                    param_dtype: str | None = None, progress: bool = True, adapter: str | os.PathLike | None = None,
                    **runtime: Any) -> Model:
    """Load an HF DeepSeek-VL / -Hybrid checkpoint directory (`model.safetensors` or shards with an index).

    Tensors are read lazily one at a time (memory-mapped), mapped to the Flax layout, cast to `param_dtype`
    (default: `dtype`) and placed on devices (sharded by the rules table when `mesh` is given).
    Raises on any missing, unexpected or mis-shaped tensor, on an unknown model type and on a corrupt file.

    `path` may also be a Flax checkpoint directory written by `deepseek-vl-jax convert` / `save_flax_checkpoint`
    (it holds the marker file `conversion.flax_checkpoint.MARKER`): its Orbax params are restored straight into
    `param_dtype` and the mesh's shardings.

    `adapter`: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, e.g. from
    `export OUT DIR --adapter` or PEFT's `save_pretrained`), folded into the weights (`lora.peft_io`).
    """
    if adapter is not None:
        from deepseek_vl_jax.lora.peft_io import merge_adapter

        model = load_pretrained(path, dtype, mesh, param_dtype, progress, **runtime)
        model.params = merge_adapter(model.params, adapter)
        return model
    param_dtype = param_dtype or dtype
    config = ModelConfig.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, **runtime)
    from deepseek_vl_jax.conversion import flax_checkpoint  # imported here: conversion imports this module

    if flax_checkpoint.is_flax_checkpoint(path):
        return Model(config, flax_checkpoint.restore_params(path, config, param_dtype, mesh), mesh)
    reader = CheckpointReader(path)
    abstract = abstract_params(config)
    shapes = meta.unbox(abstract)
    shardings = sharding.param_shardings(abstract, mesh) if mesh is not None else None
    table = hf_mapping.entries(shapes)
    ignore = ["lm_head.weight"] if config.tie_word_embeddings else []
    hf_mapping.check(table, {k: reader.shape(k) for k in reader.keys()}, ignore=ignore)
    flat_shardings = dict(hf_mapping._flatten(shardings)) if shardings is not None else {}
    target = common.to_dtype(param_dtype)
    params: dict = {}
    entries = table
    if progress:
        from tqdm.auto import tqdm
        entries = tqdm(table, desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor",
                       leave=False)
    for e in entries:
        array = hf_mapping.to_flax(e, reader.get).astype(target)
        hf_mapping.set_path(params, e.path, _put(array, flat_shardings.get(e.path)))
    return Model(config, params, mesh)

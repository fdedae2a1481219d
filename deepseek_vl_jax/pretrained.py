"""`load_pretrained`: an HF checkpoint directory -> a ready, jitted `Model`, tensor by tensor onto devices."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.sharding import Mesh

from deepseek_vl_jax import checkpoint_kinds, common, hf_mapping, multimodal, sharding
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

    Calling it runs the jitted full forward and returns logits [B, T, V] (float32), or with the keyword options of
    `__call__` an `outputs.CausalLMOutput` as transformers returns it.
    """

    config: ModelConfig
    params: Any
    mesh: Mesh | None = None

    @functools.cached_property
    def module(self) -> DeepseekVL:
        return DeepseekVL(self.config)

    @functools.cached_property
    def _forward(self):
        from deepseek_vl_jax.quantization import quantized_layers

        def forward(params, input_ids, attention_mask, pixel_values, high_res_pixel_values):
            with quantized_layers():  # Dense/Embed layers whose weights are QTensors compute from them
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

    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, high_res_pixel_values=None, *,
                 position_ids=None, inputs_embeds=None, labels=None, logits_to_keep=0, output_hidden_states=False,
                 output_attentions=False, return_dict=False):
        """The full forward. Without the keyword options: logits [B, T, V] float32 (one compiled program).

        With any of them (or return_dict=True): an `outputs.CausalLMOutput` (logits, loss, hidden_states, attentions,
        image_hidden_states), transformers' semantics: position_ids [B, T] (default cumsum(mask) - 1),
        inputs_embeds [B, T, D] instead of input_ids, labels [B, T] (-100 ignored) for the loss, logits_to_keep
        (k > 0: the last k positions; or an index array). A separate program per set of flags.
        """
        plain = (position_ids is None and inputs_embeds is None and labels is None and
                 (isinstance(logits_to_keep, int) and logits_to_keep == 0) and not output_hidden_states and
                 not output_attentions and not return_dict)
        if plain:
            if input_ids is None:
                raise ValueError("give input_ids (or inputs_embeds)")
            self.check_inputs(input_ids, pixel_values, high_res_pixel_values)
            if attention_mask is None:
                attention_mask = np.ones(np.shape(input_ids), np.int32)
            args = [jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                    None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32),
                    None if high_res_pixel_values is None or pixel_values is None
                    else jnp.asarray(high_res_pixel_values, jnp.float32)]
            with self._context():
                return self._forward(self.params, *args)
        return self._outputs(input_ids, attention_mask, pixel_values, high_res_pixel_values, position_ids,
                             inputs_embeds, labels, logits_to_keep, bool(output_hidden_states),
                             bool(output_attentions))

    def _context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(sharding.axis_rules(self.mesh))
        return stack

    @functools.cached_property
    def _outputs_program(self):
        from deepseek_vl_jax import outputs

        return jax.jit(functools.partial(outputs.forward, self.module),
                       static_argnames=("output_hidden_states", "output_attentions", "logits_to_keep"))

    def _outputs(self, input_ids, attention_mask, pixel_values, high_res_pixel_values, position_ids, inputs_embeds,
                 labels, logits_to_keep, output_hidden_states, output_attentions):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            embeds = np.asarray(inputs_embeds, np.float32)
            if embeds.ndim != 3 or embeds.shape[-1] != self.config.text.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, length, {self.config.text.hidden_size}], got shape "
                                 f"{embeds.shape}")
            shape = embeds.shape[:2]
            row = np.asarray(self.embed_tokens(np.full((1, 1), self.config.image_token_id))[0, 0], np.float32)
            ids = np.where(np.all(embeds == row, axis=-1), self.config.image_token_id, -1)  # only for the checks
        else:
            ids = np.asarray(input_ids)
            shape = ids.shape
        self.check_inputs(ids, pixel_values, high_res_pixel_values)
        if labels is not None:
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError("labels need the logits of every position: use logits_to_keep=0 with labels")
            if np.shape(labels) != shape:
                raise ValueError(f"labels shape {np.shape(labels)} differs from the inputs' {shape}")
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and np.shape(value) != shape:
                raise ValueError(f"{name} shape {np.shape(value)} differs from the inputs' {shape}")
        if not isinstance(logits_to_keep, int):
            logits_to_keep = tuple(int(i) for i in np.asarray(logits_to_keep).reshape(-1))
        elif logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
        as_float = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
        mask = np.ones(shape, np.int32) if attention_mask is None else attention_mask
        with self._context():
            return self._outputs_program(
                self.params, as_int(input_ids), as_float(inputs_embeds), as_int(mask), as_float(pixel_values),
                None if pixel_values is None else as_float(high_res_pixel_values), as_int(position_ids),
                as_int(labels), output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                logits_to_keep=logits_to_keep)

    @functools.cached_property
    def _image_features(self):
        return jax.jit(lambda params, px, hr: self.module.apply({"params": params}, px, hr, method="encode_images"))

    def get_image_features(self, pixel_values, high_res_pixel_values=None) -> jax.Array:
        """pixel_values [N, 3, H, W] (and high_res_pixel_values [N, 3, Hh, Wh] for the hybrid model) -> the aligned
        image features [N, P, D] that replace the image tokens (transformers' `get_image_features(...).pooler_output`)."""
        n = int(np.shape(pixel_values)[0])
        ids = np.full((1, n * self.config.num_image_tokens), self.config.image_token_id)
        self.check_inputs(ids, pixel_values, high_res_pixel_values)
        hr = None if high_res_pixel_values is None else jnp.asarray(high_res_pixel_values, jnp.float32)
        with self._context():
            return self._image_features(self.params, jnp.asarray(pixel_values, jnp.float32), hr)

    @functools.cached_property
    def _embed_tokens(self):
        return jax.jit(lambda params, ids: self.module.apply({"params": params}, ids,
                                                             method=lambda m, i: m.language_model.embed(i)))

    def embed_tokens(self, input_ids) -> jax.Array:
        """The text embeddings [B, T, D] of input_ids [B, T] (transformers' `get_input_embeddings()(input_ids)`)."""
        with self._context():
            return self._embed_tokens(self.params, jnp.asarray(input_ids, jnp.int32))


def _put(array: np.ndarray, target: jax.sharding.Sharding | None):
    if target is None:
        return jax.device_put(np.ascontiguousarray(array))  # a plain copy (jnp.asarray compiles a program per shape)
    # Each process builds only the shards it holds: works unchanged on multi-host meshes.
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def _release_pages(reader: CheckpointReader) -> None:
    import mmap

    for f in reader.files.values():
        m = getattr(f, "_mmap", None)
        if m is not None and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None,
                    param_dtype: str | None = None, progress: bool = True, quantize: Any = None,
                    adapter: str | os.PathLike | None = None, abstract_fn: Any = None,
                    **runtime: Any) -> Model:
    """Load an HF DeepSeek-VL / -Hybrid checkpoint directory (`model.safetensors` or shards with an index).

    Tensors are read lazily one at a time (memory-mapped), mapped to the Flax layout, cast to `param_dtype`
    (default: `dtype`) and placed on devices (sharded by the rules table when `mesh` is given).
    Raises on any missing, unexpected or mis-shaped tensor, on an unknown model type and on a corrupt file.

    `path` may also be a Flax checkpoint directory written by `deepseek-vl-jax convert` / `save_flax_checkpoint`
    (it holds the marker file `conversion.flax_checkpoint.MARKER`), or a `train` output directory (its latest
    checkpoint): its Orbax params are restored straight into `param_dtype` and the mesh's shardings.

    quantize: None, "int8" (per output channel), "int4" (per group of 128 input rows) or a
    `quantization.QuantizeConfig` (group size, LM head, embeddings, vision towers): each selected tensor is
    quantized as it is loaded (scales in `dtype`), so host memory stays near the quantized size. A quantized Flax
    checkpoint restores as stored (a conflicting `quantize` is an error).

    `adapter`: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`, e.g. from
    `export OUT DIR --adapter` or PEFT's `save_pretrained`), folded into the float weights (`lora.peft_io`) before
    any `quantize`.

    `abstract_fn`: config -> the boxed abstract params, default `abstract_params` (traces the model's init); the CLI
    passes `program_cache.ProgramStore.abstract_params`, which keeps them on disk for the next process.
    """
    if adapter is not None:
        from deepseek_vl_jax.lora.peft_io import merge_adapter

        model = load_pretrained(path, dtype, mesh, param_dtype, progress, abstract_fn=abstract_fn, **runtime)
        model.params = merge_adapter(model.params, adapter)
        if quantize is not None:
            from deepseek_vl_jax.quantization import quantize_params

            model.params = quantize_params(model.params, (abstract_fn or abstract_params)(model.config), quantize,
                                           dtype, mesh)
        return model
    param_dtype = param_dtype or dtype
    config = ModelConfig.from_pretrained(path, dtype=dtype, param_dtype=param_dtype, **runtime)
    if checkpoint_kinds.is_flax_checkpoint(path) or checkpoint_kinds.is_training_output(path):
        from deepseek_vl_jax.conversion import flax_checkpoint  # imported here: conversion imports this module

        return Model(config, flax_checkpoint.restore_params(path, config, param_dtype, mesh, quantize=quantize,
                                                            scale_dtype=dtype), mesh)
    reader = CheckpointReader(path)
    abstract = (abstract_fn or abstract_params)(config)
    shapes = meta.unbox(abstract)
    qplan = {}
    if quantize is not None:
        from deepseek_vl_jax import quantization

        qplan = quantization.plan(abstract, quantization.QuantizeConfig.create(quantize))  # errors before loading
    if mesh is None:
        shardings = None
    elif qplan:
        shardings = quantization.shardings_for(abstract, qplan, mesh)
    else:
        shardings = sharding.param_shardings(abstract, mesh)
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
        array = np.asarray(hf_mapping.to_flax(e, reader.get)).astype(target)  # a copy: off the memory map
        where = flat_shardings.get(e.path)
        if e.path in qplan:
            qt = quantization.quantize_leaf(array, qplan[e.path], common.to_dtype(dtype), e.path)
            del array
            value = qt.replace(values=_put(qt.values, where and where.values),
                               scales=_put(qt.scales, where and where.scales))
        else:
            value = _put(array, where)
        hf_mapping.set_path(params, e.path, value)
        _release_pages(reader)  # the source pages read so far leave this process's memory (page cache keeps them)
    return Model(config, params, mesh)

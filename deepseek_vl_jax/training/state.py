"""The train state's shardings, its abstract (shape-only) form, and creating it already sharded.

Shardings come from the abstract parameters (`jax.eval_shape` of the module's init, with logical axis names) through
`sharding.RULES`; the optimizer's moments follow their parameters. The state is then made by jitted functions
with those `out_shardings`, so no array ever exists unsharded.

Under QLoRA the frozen base is `deepseek_vl_jax.quantization`'s: its planned kernels are `QTensor`s (shapes by
`abstract_quantized`, shardings by `shardings_for`), loaded quantized tensor by tensor (`load_pretrained(quantize=)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.core import meta
from jax.sharding import Mesh

from deepseek_vl_jax import lora as lora_lib
from deepseek_vl_jax import common, pretrained, quantization, sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.training import optimizer as opt_lib
from deepseek_vl_jax.training.config import TrainableConfig
from deepseek_vl_jax.training.step import TrainState


def boxed_params(config: ModelConfig, lora: lora_lib.LoraConfig | None = None):
    """The boxed abstract params, with LoRA adapters (and a quantized base) when `lora` is enabled."""
    boxed = pretrained.abstract_params(config)
    if lora is not None and lora.enabled:
        boxed = lora_lib.abstract(boxed, lora, common.to_dtype(config.param_dtype))
    return boxed


def base_quantization(config: ModelConfig, lora: lora_lib.LoraConfig, trainable: TrainableConfig,
                      model_dir: str | None = None) -> quantization.QuantizeConfig | None:
    """How the frozen base is stored: QLoRA's `lora.quantize_config()`, or, for a quantized converted checkpoint
    `model_dir`, its stored settings (which `lora.quantize` / `group_size` must name). No quantized parameter may
    belong to a trainable tower."""
    requested = lora.quantize_config()
    stored = None
    if model_dir is not None:
        from deepseek_vl_jax.conversion import flax_checkpoint
        from deepseek_vl_jax.quantization import checkpoint as quantized

        if flax_checkpoint.is_flax_checkpoint(model_dir):
            stored = quantized.stored_config(flax_checkpoint.read_marker(model_dir))
    if stored is not None:
        int4 = stored.scheme == quantization.Scheme.INT4
        same = requested is not None and requested.scheme == stored.scheme and (
            not int4 or requested.group_size == stored.group_size)
        if not same:
            want = f"lora.quantize={stored.scheme.value}" + (f" lora.group_size={stored.group_size}" if int4 else "")
            raise lora_lib.LoraError(f"{model_dir} is a quantized checkpoint ({stored.scheme.value}"
                                     + (f", group size {stored.group_size}" if int4 else "") + f"): train QLoRA on "
                                     f"it with {want}, or train on the float checkpoint it was converted from")
    qconfig = stored or requested
    if qconfig is not None:
        towers = {p[0] for p in quantization.plan(pretrained.abstract_params(config), qconfig)}
        clash = sorted(towers & set(trainable.collections()))
        if clash:
            raise lora_lib.LoraError(f"lora.quantize stores tower(s) {clash} quantized and frozen, but they are "
                                     "trainable; freeze them (trainable.<tower>: false) or drop lora.quantize")
    return qconfig


def param_shardings(config: ModelConfig, mesh: Mesh, lora: lora_lib.LoraConfig | None = None,
                    qconfig: quantization.QuantizeConfig | None = None):
    """NamedShardings of the params (a QTensor of two shardings for each quantized base kernel)."""
    boxed = boxed_params(config, lora)
    if qconfig is None:
        return sharding.param_shardings(boxed, mesh)
    return quantization.shardings_for(boxed, quantization.plan(boxed, qconfig), mesh)


def abstract_params(config: ModelConfig, lora: lora_lib.LoraConfig | None = None,
                    qconfig: quantization.QuantizeConfig | None = None):
    """The params as ShapeDtypeStructs (QTensors of them for a quantized base, scales in the compute dtype as
    `load_pretrained(quantize=)` makes them)."""
    boxed = boxed_params(config, lora)
    shapes = meta.unbox(boxed)
    if qconfig is None:
        return shapes
    return quantization.abstract_quantized(shapes, quantization.plan(boxed, qconfig), common.to_dtype(config.dtype),
                                           common.to_dtype(config.param_dtype))


def shardings(config: ModelConfig, tx: optax.GradientTransformation, trainable: TrainableConfig,
              mesh: Mesh, lora: lora_lib.LoraConfig | None = None,
              qconfig: quantization.QuantizeConfig | None = None) -> TrainState:
    """A TrainState of NamedShardings."""
    params = param_shardings(config, mesh, lora, qconfig)
    train_abstract, _ = opt_lib.split(abstract_params(config, lora, qconfig), trainable)
    train_shardings, _ = opt_lib.split(params, trainable)
    opt_shardings = opt_lib.state_shardings(tx, train_abstract, train_shardings, mesh)
    return TrainState(step=sharding.replicated(mesh), params=params, opt_state=opt_shardings)


def abstract(config: ModelConfig, tx: optax.GradientTransformation, trainable: TrainableConfig,
             state_shardings: TrainState, lora: lora_lib.LoraConfig | None = None,
             qconfig: quantization.QuantizeConfig | None = None) -> TrainState:
    """The state as ShapeDtypeStructs with shardings (a restore target), allocating nothing."""
    params = abstract_params(config, lora, qconfig)
    train, _ = opt_lib.split(params, trainable)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, train))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_shardings)


def create(params, tx: optax.GradientTransformation, trainable: TrainableConfig,
           state_shardings: TrainState | None = None, step: int = 0) -> TrainState:
    """A state around (already placed) `params`: optimizer state made sharded by a jitted `tx.init`."""
    train, _ = opt_lib.split(params, trainable)
    if state_shardings is None:
        return TrainState(jnp.int32(step), params, jax.jit(tx.init)(train))
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(train)
    step_array = jax.jit(lambda: jnp.int32(step), out_shardings=state_shardings.step)()
    return TrainState(step_array, params, opt_state)


def init_random(config: ModelConfig, rng: jax.Array, tx: optax.GradientTransformation, trainable: TrainableConfig,
                mesh: Mesh | None = None) -> TrainState:
    """A fresh state with random parameters (created already sharded when a mesh is given)."""
    params = pretrained.init_params(config, rng, mesh)
    return create(params, tx, trainable, shardings(config, tx, trainable, mesh) if mesh is not None else None)


def add_lora(params, lora: lora_lib.LoraConfig, trainable: TrainableConfig, rng: jax.Array,
             state_shardings: TrainState | None = None):
    """A base model's params (float or quantized) -> a LoRA model's (adapters initialised on the state's
    shardings; the base's arrays kept as they are). The adapted towers must be frozen: LoRA replaces their
    training."""
    train = set(trainable.collections())
    clash = sorted({p[0] for p in lora_lib.targets(params, lora) if p[0] in train})
    if clash:
        raise lora_lib.LoraError(f"lora targets modules of trainable tower(s) {clash}; freeze them "
                                 "(trainable.<tower>: false) or drop those targets")
    return lora_lib.add_adapters(params, lora, rng,
                                 None if state_shardings is None else state_shardings.params[lora_lib.ADAPTERS])

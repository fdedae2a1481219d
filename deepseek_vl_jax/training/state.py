"""The train state's shardings, its abstract (shape-only) form, and creating it already sharded.

Shardings come from the abstract parameters (`jax.eval_shape` of the module's init, with logical axis names) through
`sharding.RULES`; the optimizer's moments follow their parameters. The state is then made by jitted functions
with those `out_shardings`, so no array ever exists unsharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax.core import meta
from jax.sharding import Mesh

from deepseek_vl_jax import lora as lora_lib
from deepseek_vl_jax import common, pretrained, sharding
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


def shardings(config: ModelConfig, tx: optax.GradientTransformation, trainable: TrainableConfig,
              mesh: Mesh, lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """A TrainState of NamedShardings."""
    boxed = boxed_params(config, lora)
    param_shardings = sharding.param_shardings(boxed, mesh)
    train_abstract, _ = opt_lib.split(meta.unbox(boxed), trainable)
    train_shardings, _ = opt_lib.split(param_shardings, trainable)
    opt_shardings = opt_lib.state_shardings(tx, train_abstract, train_shardings, mesh)
    return TrainState(step=sharding.replicated(mesh), params=param_shardings, opt_state=opt_shardings)


def abstract(config: ModelConfig, tx: optax.GradientTransformation, trainable: TrainableConfig,
             state_shardings: TrainState, lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """The state as ShapeDtypeStructs with shardings (a restore target), allocating nothing."""
    params = meta.unbox(boxed_params(config, lora))
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
    """A base model's params -> a LoRA model's (adapters initialised; the targeted kernels quantized under QLoRA),
    created on the state's shardings. The adapted towers must be frozen: LoRA replaces their training."""
    train = set(trainable.collections())
    clash = sorted({p[0] for p in lora_lib.targets(params, lora) if p[0] in train})
    if clash:
        raise lora_lib.LoraError(f"lora targets modules of trainable tower(s) {clash}; freeze them "
                                 "(trainable.<tower>: false) or drop those targets")
    return lora_lib.add_adapters(params, lora, rng, None if state_shardings is None else state_shardings.params)

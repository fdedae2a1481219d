"""What trains and how: splitting the parameters by tower, the AdamW optimizer with warm-up + cosine decay,
clipping and the weight-decay mask, and the shardings of its state.

Frozen towers are split off before the optimizer sees the parameters, so they get no gradient, no optimizer state
(not even zeros) and no update.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax
from jax.sharding import Mesh

from deepseek_vl_jax import sharding
from deepseek_vl_jax.lora.adapters import ADAPTERS
from deepseek_vl_jax.training.config import OptimizerConfig, TrainableConfig

Params = Mapping[str, Any]

# Leaves that are matmul / convolution kernels, the only ones weight decay applies to.
DECAYED_LEAVES = ("kernel", "in_proj_kernel")
EMBEDDING_LEAF = "embedding"


def split(params: Params, trainable: TrainableConfig) -> tuple[dict, dict]:
    """(trainable, frozen) top-level parameter collections; LoRA adapters (`params["lora"]`) always train."""
    names = set(trainable.collections()) | {ADAPTERS}
    train = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    if not train:
        raise ValueError(f"no trainable parameters: the model has {sorted(params)}, trainable towers own {sorted(names)}")
    return train, frozen


def merge(train: Params, frozen: Params) -> dict:
    return {**frozen, **train}


def decay_mask(params: Params, decay_embeddings: bool = False):
    """True where weight decay applies: kernels (and token embeddings if asked). Norms, biases, alpha, position and
    relative-position tables are never decayed."""
    leaves = DECAYED_LEAVES + ((EMBEDDING_LEAF,) if decay_embeddings else ())

    def mask(path, _):
        return getattr(path[-1], "key", None) in leaves

    return jax.tree_util.tree_map_with_path(mask, params)


def learning_rate_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_learning_rate_ratio * peak` at
    `total_steps`."""
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    if warmup == 0 and opt.min_learning_rate_ratio == 1.0:
        return optax.constant_schedule(opt.learning_rate)  # independent of total_steps (same compiled step)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else opt.learning_rate, peak_value=opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt.learning_rate * opt.min_learning_rate_ratio)


def make_optimizer(opt: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decoupled weight decay)."""
    chain = []
    if opt.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    chain.append(optax.adamw(learning_rate_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay,
                             mask=lambda p: decay_mask(p, opt.decay_embeddings)))
    return optax.chain(*chain)


def state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh):
    """Shardings of `tx.init(params)`: each moment like its parameter, counters and the like replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated)

"""Names used across the package: mesh axes, logical axes, activations, dtypes, remat policies.

One place for every string that would otherwise be scattered about (MaxText's `common_types.py`).
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp

# Mesh axes. A mesh always has all three; a size of 1 switches one off.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axes of parameters and activations. `sharding.RULES` maps them to mesh axes.
BATCH = "batch"  # activations: batch (or images)
LENGTH = "length"  # activations: sequence / patches
EMBED = "embed"  # model width
MLP = "mlp"  # feed-forward width
HEADS = "heads"  # query heads x head_dim, flattened
KV_HEADS = "kv_heads"  # key/value heads x head_dim, flattened
VOCAB = "vocab"
LAYERS = "layers"  # the stacked-layer axis that nn.scan adds
NORM = "norm"  # scales and biases of norms, small vectors
CONV_SPATIAL = "conv_spatial"  # kernel height/width of convolutions
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
POSITIONS = "positions"  # learned position tables
REL_POS = "rel_pos"  # SAM relative position tables
SCALAR = "scalar"  # e.g. the hybrid model's learned alpha
LORA_RANK = "lora_rank"  # the rank axis of LoRA adapters

IGNORE_INDEX = -100

# Flax collections the decoder sows per-layer outputs into when the caller makes them mutable (`Model` outputs).
HIDDEN_STATES = "hidden_states"  # each block's output [L, B, T, D]
ATTENTIONS = "attentions"  # attention probabilities [L, B, N, T, S] (computed explicitly only then)


class ModelType(str, enum.Enum):
    DEEPSEEK_VL = "deepseek_vl"
    DEEPSEEK_VL_HYBRID = "deepseek_vl_hybrid"


class RematPolicy(str, enum.Enum):
    NONE = "none"  # keep every activation (fastest, most memory)
    FULL = "full"  # recompute everything in the backward pass
    DOTS = "dots"  # save matmul outputs, recompute the rest
    DOTS_NO_BATCH = "dots_no_batch"  # save matmul outputs without a batch dimension (weights-like)


def checkpoint_policy(policy: RematPolicy):
    """The `jax.checkpoint` policy for a remat setting (None for NONE: no remat at all)."""
    return {
        RematPolicy.NONE: None,
        RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
        RematPolicy.DOTS: jax.checkpoint_policies.checkpoint_dots,
        RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[RematPolicy(policy)]


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def to_dtype(name) -> jnp.dtype:
    """A dtype from a name ('float32', 'bfloat16', 'float16') or a dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[name])
    return jnp.dtype(name)

"""Logits processors and the token sampler, with transformers' semantics and order.

Order (as transformers' `_get_logits_processor`): repetition penalty (also in greedy mode), then, only when
sampling, temperature, top-k, top-p; then a categorical draw (or the argmax when greedy).

One difference: the repetition penalty applies to the tokens of the prompt and of the answer, never to padding
(`mark_seen` takes the attention mask). transformers' generate penalises every id of `input_ids`, the pad token of
left-padded rows included, so there a padded row's answer can differ from the same prompt's alone; here it cannot
(tests/test_original_checkpoints.py). The original DeepSeek-VL code generates from `inputs_embeds`, where
transformers penalises only the generated tokens.

`Sampler` is static (hashable, a jit static argument: which processors run); `SamplingParams` holds the values
(traced: changing a temperature or top-p does not recompile). Shapes: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which processors run. Built by `Sampler.create` from user values, so that e.g. top_p=1.0 costs nothing."""

    do_sample: bool = False
    temperature: bool = False
    top_k: bool = False
    top_p: bool = False
    repetition_penalty: bool = False

    @classmethod
    def create(cls, do_sample: bool, temperature: float, top_k: int, top_p: float,
               repetition_penalty: float) -> "Sampler":
        check_values(do_sample, temperature, top_k, top_p, repetition_penalty)
        return cls(do_sample=bool(do_sample), temperature=bool(do_sample and temperature != 1.0),
                   top_k=bool(do_sample and top_k), top_p=bool(do_sample and top_p < 1.0),
                   repetition_penalty=repetition_penalty != 1.0)


@struct.dataclass
class SamplingParams:
    """Traced values of the processors (scalars)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array

    @classmethod
    def create(cls, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> "SamplingParams":
        put = lambda x, dtype: jax.device_put(np.asarray(x, dtype))  # a copy, not a compiled conversion per dtype
        return cls(put(temperature, np.float32), put(top_k, np.int32), put(top_p, np.float32),
                   put(repetition_penalty, np.float32))


def check_values(do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    """Raise ValueError on values transformers rejects too (before anything is compiled)."""
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a strictly positive float, got {repetition_penalty}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False for greedy)")


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits [B, V], seen bool [B, V]: divide positive / multiply negative logits of seen tokens by `penalty`."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the tokens whose logit is >= the k-th largest (ties with it are kept, as torch.topk + `<`)."""
    k = jnp.clip(k, 1, logits.shape[-1])
    kth = jnp.take_along_axis(-jnp.sort(-logits, axis=-1), jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None],
                              axis=-1)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Nucleus filter with transformers' `TopPLogitsWarper` semantics: sort ascending, remove the tokens whose
    cumulative probability is <= 1 - p (the smallest set with mass >= p survives), always keep the most likely."""
    order = jnp.argsort(logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted = remove_sorted.at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def process_logits(sampler: Sampler, params: SamplingParams, logits: jax.Array,
                   seen: jax.Array | None = None) -> jax.Array:
    """All enabled processors in transformers' order. logits [B, V] float32 -> [B, V]."""
    if sampler.repetition_penalty:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if sampler.temperature:
        logits = logits / params.temperature
    if sampler.top_k:
        logits = top_k_filter(logits, params.top_k)
    if sampler.top_p:
        logits = top_p_filter(logits, params.top_p)
    return logits


def sample(sampler: Sampler, params: SamplingParams, logits: jax.Array, rng: jax.Array,
           seen: jax.Array | None = None) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax when greedy, else a categorical draw after processing."""
    return pick(sampler, process_logits(sampler, params, logits.astype(jnp.float32), seen), rng)


def pick(sampler: Sampler, processed: jax.Array, rng: jax.Array) -> jax.Array:
    """Next tokens [B] int32 from processed logits [B, V]: the argmax when greedy, else a categorical draw."""
    if not sampler.do_sample:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, processed, axis=-1).astype(jnp.int32)


def mark_seen(seen: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """seen bool [B, V] |= one-hot of tokens [B, T] (only where valid [B, T])."""
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid.astype(bool)
    if tokens.ndim == 1:
        tokens, valid = tokens[:, None], valid[:, None]
    rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
    return seen.at[rows, tokens].max(valid)

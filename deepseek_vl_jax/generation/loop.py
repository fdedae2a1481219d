"""The compiled parts of generation: prefill (vision encoders + prompt, once), one decode step, and the whole
decode loop as one `lax.while_loop` that stops at max_new_tokens or when every row has emitted an end token.

`params` here is `weights.generation_params(model)`: {"params": the rest, "layers": one tree per decoder layer}
(CPU), or {"params": the model's params, "layers": None} (the decoder scanned over its stacked layers).
Shapes: B batch, T padded prompt length (a bucket), G generated-token buffer, S = T + G cache slots, V vocabulary.
Prompts are left-padded, so the last prompt slot holds every row's last real token.

`programs(config, sampler, mesh)` returns the jitted functions for one (model config, static sampler, mesh); they
are cached, so every call with the same bucket shapes reuses one compilation. `compile_count()` counts traces.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from deepseek_vl_jax import multimodal
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.generation import kv_cache, sampling
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.quantization import quantized_layers

_TRACES: collections.Counter = collections.Counter()


def compile_count(kind: str | None = None) -> int:
    """How many times a generation program was traced (= compiled): all kinds, or one of 'prefill', 'step',
    'generate'. Tests use it to check that prompts of different lengths within a bucket share one compilation."""
    return sum(_TRACES.values()) if kind is None else _TRACES[kind]


@struct.dataclass
class StopParams:
    """When to stop: eos ids [E] (-1 = unused slot), the pad id written after a row's end, and the step limit."""

    eos: jax.Array
    pad: jax.Array
    max_new_tokens: jax.Array


@struct.dataclass
class DecodeState:
    """The sampler state carried through the loop (and, when streaming, between host steps)."""

    step: jax.Array  # int32 scalar: tokens generated so far (>= 1 after prefill)
    tokens: jax.Array  # [B, G] int32 generated ids, pad after a row's eos
    positions: jax.Array  # [B] int32 position of the last generated token (the next one to feed)
    key_valid: jax.Array  # [B, S] bool: cache slots holding real tokens
    cache: Any  # one (k [B, K, S, H], v [B, K, H, S]) per layer, or both stacked [L, ...] (see kv_cache)
    done: jax.Array  # [B] bool: the row has emitted an end token
    rng: jax.Array  # PRNG key, split every step
    seen: jax.Array | None  # [B, V] bool tokens in prompt + output (only with a repetition penalty)


def _is_eos(tokens: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == eos[None, :], axis=-1)


def _decoder(apply, params, embeds, positions, mask, cache, cache_index):
    """The decoder over per-layer weights (`decode_layers`) or scanned over the stacked ones (`decode`)."""
    if params["layers"] is None:
        return apply(embeds, positions, mask, cache, cache_index, method="decode")
    return apply(embeds, positions, mask, params["layers"], cache, cache_index, method="decode_layers")


def prompt_logits(module: DeepseekVL, mesh: Mesh | None, gen_len: int, params, inputs: dict):
    """Encode the images and run the prompt [B, T] through the decoder into a fresh cache of S = T + gen_len slots.
    Returns (logits [B, V] float32 at the last prompt slot, cache, key_valid [B, S])."""
    config = module.config
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    apply = functools.partial(module.apply, {"params": params["params"]})
    embeds = apply(ids, inputs.get("pixel_values"), inputs.get("high_res_pixel_values"), method="embed")
    key_valid = jnp.zeros((b, t + gen_len), bool).at[:, :t].set(mask.astype(bool))
    cache = kv_cache.init_cache(config.text, b, t + gen_len, embeds.dtype, stacked=params["layers"] is None)
    cache = kv_cache.constrain_cache(cache, mesh, config.text)
    positions = multimodal.positions_from_mask(mask)
    hidden, cache = _decoder(apply, params, embeds, positions, multimodal.cache_mask(key_valid, 0, t), cache, 0)
    return apply(hidden[:, -1:], method="logits")[:, 0], cache, key_valid


def next_logits(module: DeepseekVL, params, state: "DecodeState"):
    """Feed the last generated token at its slot T + step - 1. Returns (logits [B, V], cache, key_valid)."""
    b, gen_len = state.tokens.shape
    slot = state.key_valid.shape[1] - gen_len + state.step - 1
    apply = functools.partial(module.apply, {"params": params["params"]})
    last = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # [B, 1]
    key_valid = jax.lax.dynamic_update_slice_in_dim(state.key_valid, jnp.ones((b, 1), bool), slot, axis=1)
    mask = multimodal.cache_mask(key_valid, slot, 1)
    hidden, cache = _decoder(apply, params, apply(last, method="embed"), state.positions[:, None], mask, state.cache,
                             slot)
    return apply(hidden, method="logits")[:, 0], cache, key_valid


def prefill(module: DeepseekVL, sampler: sampling.Sampler, mesh: Mesh | None, gen_len: int, params, inputs: dict,
            rng: jax.Array, sp: sampling.SamplingParams, stop: StopParams) -> DecodeState:
    """`prompt_logits`, then sample the first token: the state after one generated token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logits, cache, key_valid = prompt_logits(module, mesh, gen_len, params, inputs)
    seen = None
    if sampler.repetition_penalty:
        seen = sampling.mark_seen(jnp.zeros(logits.shape, bool), ids, mask)
    rng, key = jax.random.split(rng)
    token = sampling.sample(sampler, sp, logits, key, seen)
    if seen is not None:
        seen = sampling.mark_seen(seen, token)
    tokens = jnp.full((ids.shape[0], gen_len), stop.pad, jnp.int32).at[:, 0].set(token)
    return DecodeState(step=jnp.int32(1), tokens=tokens, positions=jnp.sum(mask, axis=-1).astype(jnp.int32),
                       key_valid=key_valid, cache=cache, done=_is_eos(token, stop.eos), rng=rng, seen=seen)


def decode_step(module: DeepseekVL, sampler: sampling.Sampler, params, state: DecodeState,
                sp: sampling.SamplingParams, stop: StopParams) -> DecodeState:
    """Feed the last generated token, sample the next one and write it (pad for rows already done)."""
    logits, cache, key_valid = next_logits(module, params, state)
    rng, key = jax.random.split(state.rng)
    token = sampling.sample(sampler, sp, logits, key, state.seen)
    token = jnp.where(state.done, stop.pad, token)
    seen = state.seen
    if seen is not None:
        seen = sampling.mark_seen(seen, token, ~state.done)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    return DecodeState(step=state.step + 1, tokens=tokens, positions=state.positions + 1, key_valid=key_valid,
                       cache=cache, done=state.done | _is_eos(token, stop.eos), rng=rng, seen=seen)


def keep_going(state: DecodeState, stop: StopParams) -> jax.Array:
    return (state.step < stop.max_new_tokens) & ~jnp.all(state.done)


def run(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop):
    """Prefill, then the decode loop as one `lax.while_loop`. Returns (tokens [B, G], steps taken)."""
    state = prefill(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop)
    state = jax.lax.while_loop(lambda s: keep_going(s, stop),
                               lambda s: decode_step(module, sampler, params, s, sp, stop), state)
    return state.tokens, state.step


@dataclasses.dataclass(frozen=True)
class Programs:
    generate: Any  # (params, inputs, rng, sp, stop, gen_len) -> (tokens [B, G], steps)
    prefill: Any  # (params, inputs, rng, sp, stop, gen_len) -> DecodeState
    step: Any  # (params, state, sp, stop) -> DecodeState (state donated)


@functools.lru_cache(maxsize=32)
def programs(config: ModelConfig, sampler: sampling.Sampler, mesh: Mesh | None) -> Programs:
    """The jitted generation functions for one model config, static sampler and mesh (cached)."""
    module = DeepseekVL(config)

    def gen(params, inputs, rng, sp, stop, gen_len):
        _TRACES["generate"] += 1
        with quantized_layers():  # layers whose weights are QTensors compute from them (a no-op for float ones)
            return run(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop)

    def pre(params, inputs, rng, sp, stop, gen_len):
        _TRACES["prefill"] += 1
        with quantized_layers():
            return prefill(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop)

    def step(params, state, sp, stop):
        _TRACES["step"] += 1
        with quantized_layers():
            return decode_step(module, sampler, params, state, sp, stop)

    return Programs(generate=jax.jit(gen, static_argnums=5), prefill=jax.jit(pre, static_argnums=5),
                    step=jax.jit(step, donate_argnums=1))

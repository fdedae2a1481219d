"""`generate`: processor output -> new token ids, on host. Validates, re-pads the prompt (left) to its length
bucket, pads the image count to a power of two, resolves eos/pad ids, then runs the compiled programs of
`loop.py`: one call (prefill + while_loop) without a streamer, or prefill and a per-token host loop with one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax import sharding
from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
from deepseek_vl_jax.generation.inputs import MAX_EOS, place, prepare_inputs, resolve_eos
from deepseek_vl_jax.generation.validation import check_sampling


def generate(model, batch: Mapping[str, Any], max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int = 0, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             streamer: Any = None) -> np.ndarray:
    """Generate up to `max_new_tokens` tokens for each row of a processor batch.

    model: a `Model` from `load_pretrained` (params possibly sharded over `model.mesh`).
    batch: `input_ids` [B, T], `attention_mask` [B, T] (left or right padded), `pixel_values` [N, 3, H, W] and for
      the hybrid model `high_res_pixel_values`; numpy or jax arrays.
    Greedy unless `do_sample`; sampling applies repetition penalty, temperature, top-k, top-p in transformers' order
    and is reproducible from `seed`. `eos_token_id` None = the model's own, -1 or [] = never stop early.
    streamer: an object with `put(tokens [B])` and `end()` (e.g. `TextStreamer`), or a callable taking tokens [B];
      it receives each step's tokens as they are generated.
    Returns new token ids [B, max_new_tokens] (int32), `pad_token_id` after each row's eos.
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    c = model.config
    sampler = sampling.Sampler.create(do_sample, temperature, top_k, top_p, repetition_penalty)
    sp = sampling.SamplingParams.create(temperature, top_k, top_p, repetition_penalty)
    eos = resolve_eos(eos_token_id, c.text.eos_token_id)
    if len(eos) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} eos token ids are supported, got {len(eos)}")
    if pad_token_id is None:
        pad_token_id = c.text.pad_token_id if c.text.pad_token_id is not None else (eos[0] if eos else 0)
    stop = loop.StopParams(eos=jnp.asarray(list(eos) + [-1] * (MAX_EOS - len(eos)), jnp.int32),
                           pad=jnp.int32(pad_token_id), max_new_tokens=jnp.int32(max_new_tokens))
    inputs, _ = prepare_inputs(model, batch, max_new_tokens)
    gen_len = kv_cache.gen_buffer_length(max_new_tokens)
    progs = loop.programs(c, sampler, model.mesh)
    rng = jax.random.key(seed)
    params = weights.generation_params(model)
    with _mesh_context(model.mesh):
        inputs = place(inputs, model.mesh)
        if streamer is None:
            tokens, _ = progs.generate(params, inputs, rng, sp, stop, gen_len)
            return np.asarray(tokens)[:, :max_new_tokens]
        return _stream(progs, params, inputs, rng, sp, stop, gen_len, max_new_tokens, streamer)


def _stream(progs, params, inputs, rng, sp, stop, gen_len, max_new_tokens, streamer) -> np.ndarray:
    """Prefill, then one compiled step per token, handing each step's tokens to the streamer."""
    put: Callable = streamer.put if hasattr(streamer, "put") else streamer
    state = progs.prefill(params, inputs, rng, sp, stop, gen_len)
    tokens = np.full((state.tokens.shape[0], max_new_tokens), int(stop.pad), np.int32)
    tokens[:, 0] = np.asarray(state.tokens[:, 0])
    done = np.asarray(state.done)
    put(tokens[:, 0])
    try:
        for i in range(1, max_new_tokens):
            if done.all():
                break
            state = progs.step(params, state, sp, stop)
            step_tokens = np.asarray(state.tokens[:, i])
            done = np.asarray(state.done)
            tokens[:, i] = step_tokens
            put(step_tokens)
    finally:
        if hasattr(streamer, "end"):
            streamer.end()
    return tokens


def _mesh_context(mesh) -> contextlib.AbstractContextManager:
    """`jax.set_mesh(mesh)` + the logical axis rules (so the model's activation constraints apply), or nothing."""
    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(sharding.axis_rules(mesh))
    return stack

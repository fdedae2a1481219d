"""The compiled parts of generation: prefill (vision encoders + prompt, once), one decode step, and the whole
decode loop as one `lax.while_loop` that stops at max_new_tokens or when every row has emitted an end token.

`params` here is `weights.generation_params(model)`: {"params": the rest, "layers": one tree per decoder layer,
"vision_layers": one per SigLIP block} (CPU), or {"params": the model's params, "layers": None, "vision_layers":
None} (the decoder and SigLIP scanned over their stacked layers).
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
from deepseek_vl_jax.generation import kv_cache, row_dots, sampling, stopping
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.quantization import quantized_layers

_TRACES: collections.Counter = collections.Counter()


def compile_count(kind: str | None = None) -> int:
    """How many times a generation program was traced (= compiled): all kinds, or one of 'prefill', 'step',
    'generate', 'decode'. Tests use it to check that prompts of different lengths within a bucket share one compilation."""
    return sum(_TRACES.values()) if kind is None else _TRACES[kind]


# Finish reasons as the loop records them (`Extras.report`); 0: still running, or stopped by max_new_tokens.
LENGTH, EOS, STOP = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Extras:
    """Static (part of the compiled program): the optional stopping and scoring parts the loop carries. All off is
    the plain loop, traced exactly as before they existed."""

    min_new_tokens: bool = False  # mask the eos ids while fewer than StopParams.min_new_tokens were generated
    stop_window: int = 0  # > 0: keep each row's last W tokens (prompt included) for stop strings / sequences
    stop_strings: bool = False
    stop_sequences: bool = False
    report: bool = False  # the log-probability of each chosen token and each row's finish reason
    top_logprobs: int = 0  # with report: also the k most likely tokens and their log-probabilities


@struct.dataclass
class StopParams:
    """When to stop: eos ids [E] (-1 = unused slot), the pad id written after a row's end, and the step limit;
    with `Extras`: min_new_tokens (scalar), stop-string tables, stop sequences [M, W'] (see `stopping`)."""

    eos: jax.Array
    pad: jax.Array
    max_new_tokens: jax.Array
    min_new_tokens: jax.Array | None = None
    tables: stopping.StopTables | None = None
    sequences: jax.Array | None = None


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
    window: jax.Array | None = None  # [B, W] int32 each row's last W tokens (Extras.stop_window)
    logprobs: jax.Array | None = None  # [B, G] float32 of each chosen token (Extras.report; 0 after a row's end)
    top_ids: jax.Array | None = None  # [B, G, k] int32 (Extras.top_logprobs)
    top_logprobs: jax.Array | None = None  # [B, G, k] float32
    reason: jax.Array | None = None  # [B] int32 LENGTH / EOS / STOP (Extras.report)
    length: jax.Array | None = None  # [B] int32 tokens generated up to and including the end (Extras.report)


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
    embeds = apply(ids, inputs.get("pixel_values"), inputs.get("high_res_pixel_values"), params.get("vision_layers"),
                   method="embed")
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


def _choose(sampler, extras: Extras, sp, stop: StopParams, logits, key, seen, step):
    """The next tokens [B] and, with `extras.report`, their (logprob [B], top ids, top logprobs) of the processed
    distribution they were drawn from (transformers' `output_scores`, log-softmaxed)."""
    if extras.min_new_tokens:
        logits = stopping.suppress_eos(logits, stop.eos, step < stop.min_new_tokens)
    if not extras.report:
        return sampling.sample(sampler, sp, logits, key, seen), None
    processed = sampling.process_logits(sampler, sp, logits.astype(jnp.float32), seen)
    token = sampling.pick(sampler, processed, key)
    return token, stopping.token_logprobs(processed, token, extras.top_logprobs)


def _finish(extras: Extras, stop: StopParams, state: DecodeState, token, scores, window, running):
    """Write token [B] at column state.step and update done / reason / log-probabilities. running [B]: rows that
    had not ended before this token."""
    step = state.step
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], step, axis=1)
    eos = running & _is_eos(token, stop.eos)
    ended = eos
    if extras.stop_window:
        hit = jnp.zeros(token.shape, bool)
        if extras.stop_strings:
            hit = hit | stopping.stop_string_hit(stop.tables, window)
        if extras.stop_sequences:
            hit = hit | stopping.stop_sequence_hit(stop.sequences, window)
        ended = ended | (running & hit)
    new = dict(tokens=put(state.tokens, token), done=~running | ended, window=window)
    if extras.report:
        new["reason"] = jnp.where(eos, EOS, jnp.where(ended, STOP, state.reason))
        new["length"] = jnp.where(running, step + 1, state.length)
        chosen, top_ids, top_lp = scores
        new["logprobs"] = put(state.logprobs, jnp.where(running, chosen, 0.0))
        if extras.top_logprobs:
            new["top_ids"] = put(state.top_ids, jnp.where(running[:, None], top_ids, -1))
            new["top_logprobs"] = put(state.top_logprobs, jnp.where(running[:, None], top_lp, 0.0))
    return new


def _initial_window(extras: Extras, ids, mask):
    """[B, W]: the last W prompt tokens of each (left-padded) row, NEVER before its start."""
    b, t = ids.shape
    w = extras.stop_window
    tail = jnp.where(mask.astype(bool), ids, stopping.NEVER)[:, -w:]
    return jnp.concatenate([jnp.full((b, max(0, w - t)), stopping.NEVER, jnp.int32), tail.astype(jnp.int32)], 1)


def prefill(module: DeepseekVL, sampler: sampling.Sampler, mesh: Mesh | None, gen_len: int, params, inputs: dict,
            rng: jax.Array, sp: sampling.SamplingParams, stop: StopParams, extras: Extras = Extras()) -> DecodeState:
    """`prompt_logits`, then sample the first token: the state after one generated token."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    logits, cache, key_valid = prompt_logits(module, mesh, gen_len, params, inputs)
    seen = None
    if sampler.repetition_penalty:
        seen = sampling.mark_seen(jnp.zeros(logits.shape, bool), ids, mask)
    rng, key = jax.random.split(rng)
    b = ids.shape[0]
    if extras == Extras():
        token = sampling.sample(sampler, sp, logits, key, seen)
        if seen is not None:
            seen = sampling.mark_seen(seen, token)
        tokens = jnp.full((b, gen_len), stop.pad, jnp.int32).at[:, 0].set(token)
        return DecodeState(step=jnp.int32(1), tokens=tokens, positions=jnp.sum(mask, axis=-1).astype(jnp.int32),
                           key_valid=key_valid, cache=cache, done=_is_eos(token, stop.eos), rng=rng, seen=seen)
    token, scores = _choose(sampler, extras, sp, stop, logits, key, seen, jnp.int32(0))
    if seen is not None:
        seen = sampling.mark_seen(seen, token)
    k = extras.top_logprobs
    state = DecodeState(
        step=jnp.int32(0), tokens=jnp.full((b, gen_len), stop.pad, jnp.int32),
        positions=jnp.sum(mask, axis=-1).astype(jnp.int32), key_valid=key_valid, cache=cache,
        done=jnp.zeros((b,), bool), rng=rng, seen=seen,
        logprobs=jnp.zeros((b, gen_len), jnp.float32) if extras.report else None,
        top_ids=jnp.full((b, gen_len, k), -1, jnp.int32) if extras.report and k else None,
        top_logprobs=jnp.zeros((b, gen_len, k), jnp.float32) if extras.report and k else None,
        reason=jnp.full((b,), LENGTH, jnp.int32) if extras.report else None,
        length=jnp.zeros((b,), jnp.int32) if extras.report else None)
    window = stopping.push(_initial_window(extras, ids, mask), token) if extras.stop_window else None
    new = _finish(extras, stop, state, token, scores, window, jnp.ones((b,), bool))
    return state.replace(step=jnp.int32(1), **new)


def decode_step(module: DeepseekVL, sampler: sampling.Sampler, params, state: DecodeState,
                sp: sampling.SamplingParams, stop: StopParams, extras: Extras = Extras()) -> DecodeState:
    """Feed the last generated token, sample the next one and write it (pad for rows already done)."""
    logits, cache, key_valid = next_logits(module, params, state)
    rng, key = jax.random.split(state.rng)
    if extras == Extras():
        token = sampling.sample(sampler, sp, logits, key, state.seen)
        token = jnp.where(state.done, stop.pad, token)
        seen = state.seen
        if seen is not None:
            seen = sampling.mark_seen(seen, token, ~state.done)
        tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
        return DecodeState(step=state.step + 1, tokens=tokens, positions=state.positions + 1, key_valid=key_valid,
                           cache=cache, done=state.done | _is_eos(token, stop.eos), rng=rng, seen=seen)
    token, scores = _choose(sampler, extras, sp, stop, logits, key, state.seen, state.step)
    token = jnp.where(state.done, stop.pad, token)
    seen = state.seen
    if seen is not None:
        seen = sampling.mark_seen(seen, token, ~state.done)
    window = stopping.push(state.window, token) if extras.stop_window else None
    new = _finish(extras, stop, state, token, scores, window, ~state.done)
    return state.replace(step=state.step + 1, positions=state.positions + 1, key_valid=key_valid, cache=cache,
                         rng=rng, seen=seen, **new)


def keep_going(state: DecodeState, stop: StopParams) -> jax.Array:
    return (state.step < stop.max_new_tokens) & ~jnp.all(state.done)


def decode_loop(module, sampler, params, state: DecodeState, sp, stop, extras: Extras = Extras()):
    """The decode loop from a prefilled state, as one `lax.while_loop`: the final `DecodeState`."""
    return jax.lax.while_loop(lambda s: keep_going(s, stop),
                              lambda s: decode_step(module, sampler, params, s, sp, stop, extras), state)


def run(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop, extras: Extras = Extras()):
    """Prefill, then the decode loop as one `lax.while_loop`. Returns (tokens [B, G], steps taken), or with extras
    the final `DecodeState` without its cache."""
    state = prefill(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop, extras)
    state = decode_loop(module, sampler, params, state, sp, stop, extras)
    return finish_run(state, extras)


def finish_run(state: DecodeState, extras: Extras = Extras()):
    """`run`'s result from the loop's final state."""
    if extras == Extras():
        return state.tokens, state.step
    return state.replace(cache=None, key_valid=None, seen=None)


@dataclasses.dataclass(frozen=True)
class Programs:
    generate: Any  # (params, inputs, rng, sp, stop, gen_len) -> (tokens [B, G], steps), or a DecodeState (extras)
    prefill: Any  # (params, inputs, rng, sp, stop, gen_len) -> DecodeState
    step: Any  # (params, state, sp, stop) -> DecodeState (state donated)
    decode: Any = None  # (params, state, sp, stop) -> the final DecodeState of the decode loop (state donated)


# XLA:CPU compiler options for the generation programs, chosen per program by its kind (prompt or decode) and batch
# size B (the rows of its decode dots; `CpuDotPolicy`). This jaxlib hands float32 dots of 8 rows or more to YNNPACK
# by default (`ynn_fusion`; the prompt's ~600-row GEMMs too), fewer rows to XLA's own kernels. Timed side by side
# in one process, programs alternating sample by sample (benchmarks/bench_cpu_dot_options.py,
# results/cpu_dot_options.json, on / off): YNNPACK dots made a batch-8 decode step slower on every native CPU
# measured (a quiet Xeon with AVX-512: 1.23x, 1.62x under load; a native AVX2 AMD EPYC: 2.32x), and the prompt
# programs no slower (Xeon 0.99 / 1.04, EPYC 1.03 / 0.95 at batch 1 / 8; faster under AVX2 emulation on the Xeon,
# 0.66 / 0.60); a 1-row step compiles to the same kernels either way. So the prompt program keeps XLA's defaults
# and every decoding program has YNNPACK dots off, and `generate` runs as two programs (`SplitGenerate`: the second
# dispatch is the split's cost, the KV cache is handed over in place). (Until stop 30 a CPU limited to AVX2 kept
# YNNPACK dots from 8 rows, from a measurement under AVX2 emulation, `--xla_cpu_max_isa=AVX2` on the Xeon: 0.79x;
# on the native AVX2 host the same choice made batch-8 decode 2.3x slower: results/cpu_dot_options.json.)
# Passed per program (`jax.jit(compiler_options=)`), so nothing else in the process changes and no environment
# variable is involved; TPU/GPU programs get none.
YNN_DOTS_OFF = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@dataclasses.dataclass(frozen=True)
class CpuDotPolicy:
    """XLA:CPU compiler options (as (name, value) pairs) of a program whose batch has `rows` rows:
    `few_rows` below `many_rows_from`, else `many_rows` (empty: XLA's defaults). `prompt`: the options of the
    prompt program (`prefill`) at every size instead, or None (the same as the decode's). Where a batch's prompt
    and decode options differ, `generate` runs as two programs (`SplitGenerate`)."""

    few_rows: tuple = YNN_DOTS_OFF
    many_rows: tuple = YNN_DOTS_OFF
    many_rows_from: int = 8
    prompt: tuple | None = None

    def options(self, rows: int, prompt: bool = False) -> dict:
        if prompt and self.prompt is not None:
            return dict(self.prompt)
        return dict(self.few_rows if rows < self.many_rows_from else self.many_rows)


# The prompt program with XLA's defaults (YNNPACK dots), the decoding programs without, on every CPU (see above).
CPU_DOT_POLICY = CpuDotPolicy(prompt=())


def compiler_options(rows: int = 1, policy: CpuDotPolicy | None = None, prompt: bool = False) -> dict | None:
    """`policy.options(rows, prompt)` (default `CPU_DOT_POLICY`) when the default backend is the CPU, else None
    (the backend's defaults). prompt: for the prompt program (`prefill`), else for programs that decode."""
    if jax.default_backend() != "cpu":
        return None
    return (policy or CPU_DOT_POLICY).options(rows, prompt)


class ByRows:
    """A generation program jitted once per compiler option set: the one its batch size calls for
    (`compiler_options(rows(*args), policy)`; the policy is the one in force when the program was made).
    `lower(*args)` and calls take the program's arguments; `__wrapped__` is the function (program_cache jits it
    itself, with `options(*args)`)."""

    def __init__(self, fun, rows, policy: CpuDotPolicy | None = None, prompt: bool = False, **jit_kwargs):
        self.__wrapped__, self._rows, self._jit_kwargs, self._jits = fun, rows, jit_kwargs, {}
        self.policy, self.prompt = policy or CPU_DOT_POLICY, prompt

    def options(self, *args) -> dict | None:
        return compiler_options(self._rows(*args), self.policy, self.prompt)

    def jitted(self, *args):
        opts = self.options(*args)
        key = None if opts is None else tuple(sorted(opts.items()))
        if key not in self._jits:
            self._jits[key] = jax.jit(self.__wrapped__, compiler_options=opts, **self._jit_kwargs)
        return self._jits[key]

    def lower(self, *args):
        return self.jitted(*args).lower(*args)

    def eval_shape(self, *args):
        """The program's output shapes for these arguments (static ones stay static, unlike `jax.eval_shape`)."""
        return self.jitted(*args).eval_shape(*args)

    def __call__(self, *args):
        return self.jitted(*args)(*args)


class SplitGenerate:
    """`generate` as one program (prefill + decode loop, `whole`) where the policy gives a batch's prompt and its
    decode the same compiler options (always off the CPU), else as two: the `prefill` program, then the `decode`
    program (the state donated and returned, so the loop writes the KV cache in place; `finish_run` then drops
    it). Same arguments and result either way. `lower`, `eval_shape`, `options` and `__wrapped__` are the
    one-program form's."""

    def __init__(self, whole: ByRows, prefill: ByRows, decode: ByRows, extras: Extras = Extras()):
        self.whole, self.prefill, self.decode, self.extras = whole, prefill, decode, extras
        self.__wrapped__, self.policy = whole.__wrapped__, whole.policy

    def splits(self, *args) -> bool:
        """Whether a call with these arguments runs as two programs."""
        return self.prefill.options(*args) != self.whole.options(*args)

    def options(self, *args) -> dict | None:
        return self.whole.options(*args)

    def lower(self, *args):
        return self.whole.lower(*args)

    def eval_shape(self, *args):
        return self.whole.eval_shape(*args)

    def __call__(self, *args):
        return self.run(self.whole, self.prefill, self.decode, *args)

    def run(self, whole, prefill, decode, *args):
        """The call with these three programs standing for this one's (program_cache's stored ones)."""
        if not self.splits(*args):
            return whole(*args)
        params, _, _, sp, stop, _ = args
        return finish_run(decode(params, prefill(*args), sp, stop), self.extras)


def _prompt_rows(params, inputs, *_):
    return inputs["input_ids"].shape[0]


def _state_rows(params, state, *_):
    return state.tokens.shape[0]


@functools.lru_cache(maxsize=32)
def programs(config: ModelConfig, sampler: sampling.Sampler, mesh: Mesh | None,
             extras: Extras = Extras()) -> Programs:
    """The jitted generation functions for one model config, static sampler, mesh and extras (cached)."""
    module = DeepseekVL(config)

    # Dense/Embed layers whose weights are QTensors compute from them (a no-op for float ones); on CPU without a mesh
    # (which may shard their input axis), one-row float Dense layers as blocked dots (`row_dots`)
    one_row = mesh is None and row_dots.ENABLED

    def gen(params, inputs, rng, sp, stop, gen_len):
        _TRACES["generate"] += 1
        with quantized_layers(), row_dots.one_row_dots(one_row):
            return run(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop, extras)

    def pre(params, inputs, rng, sp, stop, gen_len):
        _TRACES["prefill"] += 1
        with quantized_layers(), row_dots.one_row_dots(one_row):
            return prefill(module, sampler, mesh, gen_len, params, inputs, rng, sp, stop, extras)

    def step(params, state, sp, stop):
        _TRACES["step"] += 1
        with quantized_layers(), row_dots.one_row_dots(one_row):
            return decode_step(module, sampler, params, state, sp, stop, extras)

    def dec(params, state, sp, stop):
        _TRACES["decode"] += 1
        with quantized_layers(), row_dots.one_row_dots(one_row):
            return decode_loop(module, sampler, params, state, sp, stop, extras)

    prefill_program = ByRows(pre, _prompt_rows, prompt=True, static_argnums=5)
    decode_program = ByRows(dec, _state_rows, donate_argnums=1)
    return Programs(generate=SplitGenerate(ByRows(gen, _prompt_rows, static_argnums=5), prefill_program,
                                           decode_program, extras),
                    prefill=prefill_program, step=ByRows(step, _state_rows, donate_argnums=1), decode=decode_program)

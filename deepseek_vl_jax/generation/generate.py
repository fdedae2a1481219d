"""`generate`: processor output -> new token ids, on host. Validates, re-pads the prompt (left) to its length
bucket, pads the image count to a power of two, resolves eos/pad ids, then runs the compiled programs of
`loop.py`: one call (prefill + while_loop) without a streamer, or prefill and a per-token host loop with one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax import sharding
from deepseek_vl_jax.generation import kv_cache, loop, sampling, stopping, weights
from deepseek_vl_jax.generation.inputs import MAX_EOS, place, prepare_inputs, resolve_eos
from deepseek_vl_jax.generation.validation import check_sampling

FINISH_REASONS = {loop.LENGTH: "length", loop.EOS: "eos", loop.STOP: "stop"}


@dataclasses.dataclass
class GenerateOutput:
    """`generate(..., return_dict=True)`. Rows: B * num_return_sequences (the copies of a prompt side by side).

    sequences [R, max_new_tokens] int32 new tokens (pad after a row's end); logprobs [R, max_new_tokens] float32:
    log-probability of each chosen token under the distribution it was drawn from (transformers' `output_scores`
    after log-softmax: repetition penalty, min_new_tokens, and when sampling temperature / top-k / top-p applied;
    0 after the row's end); top_logprob_ids / top_logprobs [R, max_new_tokens, k] the k most likely tokens of that
    distribution (None when top_logprobs=0); lengths [R]: tokens generated, the end token included;
    finish_reasons: "eos", "stop" (a stop string or sequence) or "length" (max_new_tokens) per row.
    """

    sequences: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    top_logprob_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


_TABLES: dict = {}  # (id(tokenizer), stop strings, vocabulary) -> (tokenizer, StopTables), a few kept


def _stop_tables(tokenizer, stop_strings: tuple[str, ...], vocab_size: int) -> stopping.StopTables:
    key = (id(tokenizer), stop_strings, vocab_size)
    if key not in _TABLES:
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = (tokenizer, stopping.stop_tables(stopping.token_bytes(tokenizer, vocab_size), stop_strings))
    return _TABLES[key][1]


def expand_rows(batch: Mapping[str, Any], n: int, image_token_id: int, tokens_per_image: int) -> dict:
    """Each row repeated n times (side by side), its images with it (row r's images are the next ones in order)."""
    ids = np.asarray(batch["input_ids"])
    out = {k: np.repeat(np.asarray(v), n, axis=0) for k, v in batch.items()
           if k in ("input_ids", "attention_mask") and v is not None}
    if batch.get("pixel_values") is not None and np.shape(batch["pixel_values"])[0]:
        counts = (ids == image_token_id).sum(-1) // tokens_per_image
        starts = np.concatenate([[0], np.cumsum(counts)])
        order = [i for r in range(ids.shape[0]) for _ in range(n) for i in range(starts[r], starts[r + 1])]
        for k in ("pixel_values", "high_res_pixel_values"):
            if batch.get(k) is not None:
                out[k] = np.asarray(batch[k])[order]
    return out


def _extras(model, min_new_tokens, stop_strings, stop_sequences, tokenizer, return_dict, top_logprobs):
    """Validate the stopping / scoring options -> (loop.Extras, StopParams fields)."""
    c = model.config
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if not 0 <= top_logprobs <= c.text.vocab_size:
        raise ValueError(f"top_logprobs must be in [0, {c.text.vocab_size}], got {top_logprobs}")
    if top_logprobs and not return_dict:
        raise ValueError("top_logprobs are returned with return_dict=True only")
    fields, window = {}, 0
    if min_new_tokens:
        fields["min_new_tokens"] = jnp.int32(min_new_tokens)
    if stop_strings is not None:
        strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=processor (as transformers' generate)")
        if strings:
            fields["tables"] = _stop_tables(tokenizer, strings, c.text.vocab_size)
            window = fields["tables"].window
    if stop_sequences is not None and len(stop_sequences):
        seqs = stopping.stop_sequences_array(stop_sequences)
        fields["sequences"] = jnp.asarray(seqs)
        window = max(window, seqs.shape[1])
    extras = loop.Extras(min_new_tokens=bool(min_new_tokens), stop_window=window,
                         stop_strings="tables" in fields, stop_sequences="sequences" in fields,
                         report=bool(return_dict), top_logprobs=int(top_logprobs) if return_dict else 0)
    return extras, fields


def generate(model, batch: Mapping[str, Any], max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int = 0, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             streamer: Any = None, min_new_tokens: int = 0, stop_strings: str | Sequence[str] | None = None,
             stop_sequences: Sequence[Sequence[int]] | None = None, tokenizer: Any = None,
             num_return_sequences: int = 1, return_dict: bool = False,
             top_logprobs: int = 0, programs: Callable | None = None) -> np.ndarray | GenerateOutput:
    """Generate up to `max_new_tokens` tokens for each row of a processor batch.

    model: a `Model` from `load_pretrained` (params possibly sharded over `model.mesh`).
    batch: `input_ids` [B, T], `attention_mask` [B, T] (left or right padded), `pixel_values` [N, 3, H, W] and for
      the hybrid model `high_res_pixel_values`; numpy or jax arrays.
    Greedy unless `do_sample`; sampling applies repetition penalty, temperature, top-k, top-p in transformers' order
    and is reproducible from `seed`. `eos_token_id` None = the model's own, -1 or [] = never stop early.
    streamer: an object with `put(tokens [B])` and `end()` (e.g. `TextStreamer`), or a callable taking tokens [B];
      it receives each step's tokens as they are generated.
    min_new_tokens: eos ids masked until that many tokens were generated. stop_strings (with `tokenizer`: the
      processor or its `tokenizers.Tokenizer`) / stop_sequences (lists of token ids): a row ends once its text /
      tokens end with one (transformers' `StopStringCriteria` semantics, prompt included), the last token kept.
    num_return_sequences: sampled continuations per prompt (rows r * n ... r * n + n - 1; needs do_sample).
    Returns new token ids [B * n, max_new_tokens] (int32), `pad_token_id` after each row's end; with return_dict a
    `GenerateOutput` (log-probabilities, `top_logprobs` alternatives, finish reasons), all computed in the loop.
    programs: `(config, sampler, mesh, extras) -> loop.Programs`, default `loop.programs` (the CLI passes
      `program_cache.ProgramStore.programs`: the same programs, kept compiled on disk for the next process).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, max_new_tokens)
    c = model.config
    sampler = sampling.Sampler.create(do_sample, temperature, top_k, top_p, repetition_penalty)
    sp = sampling.SamplingParams.create(temperature, top_k, top_p, repetition_penalty)
    eos = resolve_eos(eos_token_id, c.text.eos_token_id)
    if len(eos) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} eos token ids are supported, got {len(eos)}")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True (greedy decoding would "
                         "return the same sequence n times)")
    extras, fields = _extras(model, min_new_tokens, stop_strings, stop_sequences, tokenizer, return_dict,
                             top_logprobs)
    if pad_token_id is None:
        pad_token_id = c.text.pad_token_id if c.text.pad_token_id is not None else (eos[0] if eos else 0)
    put = lambda x: jax.device_put(np.asarray(x, np.int32))  # a copy, not a compiled conversion (jnp.int32)
    stop = loop.StopParams(eos=put(list(eos) + [-1] * (MAX_EOS - len(eos))), pad=put(pad_token_id),
                           max_new_tokens=put(max_new_tokens), **fields)
    if num_return_sequences > 1:
        model.check_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("high_res_pixel_values"))
        batch = expand_rows(batch, num_return_sequences, c.image_token_id, c.num_image_tokens)
    inputs, _ = prepare_inputs(model, batch, max_new_tokens)
    gen_len = kv_cache.gen_buffer_length(max_new_tokens)
    progs = (programs or loop.programs)(c, sampler, model.mesh, extras)
    rng = jax.random.key(seed)
    params = weights.generation_params(model)
    with _mesh_context(model.mesh):
        inputs = place(inputs, model.mesh)
        if streamer is None and extras == loop.Extras():
            tokens, _ = progs.generate(params, inputs, rng, sp, stop, gen_len)
            return np.asarray(tokens)[:, :max_new_tokens]
        if streamer is None:
            state = progs.generate(params, inputs, rng, sp, stop, gen_len)
        else:
            state = _stream(progs, params, inputs, rng, sp, stop, gen_len, max_new_tokens, streamer)
    tokens = np.asarray(state.tokens)[:, :max_new_tokens]
    if not return_dict:
        return tokens
    top = lambda x: None if x is None else np.asarray(x)[:, :max_new_tokens]
    return GenerateOutput(sequences=tokens, logprobs=np.asarray(state.logprobs)[:, :max_new_tokens],
                          lengths=np.asarray(state.length),
                          finish_reasons=[FINISH_REASONS[int(r)] for r in np.asarray(state.reason)],
                          top_logprob_ids=top(state.top_ids), top_logprobs=top(state.top_logprobs))


def _stream(progs, params, inputs, rng, sp, stop, gen_len, max_new_tokens, streamer) -> loop.DecodeState:
    """Prefill, then one compiled step per token, handing each step's tokens to the streamer. Returns the final
    state (its tokens [B, G])."""
    put: Callable = streamer.put if hasattr(streamer, "put") else streamer
    state = progs.prefill(params, inputs, rng, sp, stop, gen_len)
    done = np.asarray(state.done)
    put(np.asarray(state.tokens)[:, 0].copy())  # sliced on host (no compiled slice), a copy the streamer may keep
    try:
        for i in range(1, max_new_tokens):
            if done.all():
                break
            state = progs.step(params, state, sp, stop)
            done = np.asarray(state.done)
            put(np.asarray(state.tokens)[:, i].copy())
    finally:
        if hasattr(streamer, "end"):
            streamer.end()
    return state


def _mesh_context(mesh) -> contextlib.AbstractContextManager:
    """`jax.set_mesh(mesh)` + the logical axis rules (so the model's activation constraints apply), or nothing."""
    stack = contextlib.ExitStack()
    if mesh is not None:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(sharding.axis_rules(mesh))
    return stack

"""Memory bandwidth and batch-1 decode rates of the compiled programs, for bench_generate.py and bench_row_dots.py.

`measure_bandwidth()`: this machine's read bandwidth now (the roofline's denominator). `prefilled_decode()`: the
generation programs of a model with one batch prefilled, ready to time decode steps from. `paired_roofline()`:
rounds of (bandwidth, one timed decode-loop call) back to back.
"""

from __future__ import annotations

import time

import generate_profile as P


def measure_bandwidth() -> dict:
    """Read bandwidth of this machine, now, over 1 GiB (far beyond the caches): a jitted jnp reduction, torch's sum,
    and a float32 matrix-vector product [1, 8192] x [8192, 32768] in XLA and in torch (the access pattern of a decode
    step; XLA:CPU's reduction alone does not saturate the memory bus). `read_GBps` is the best of them: the roofline's
    denominator. Also a numpy copy of 512 MiB (read + write)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal(2**28, dtype=np.float32)  # 1 GiB
    x = jnp.asarray(a)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    t_jnp = P.best_time(lambda: total(x).block_until_ready(), 5)
    ta = torch.from_numpy(a)
    t_torch = P.best_time(lambda: ta.sum(), 5)
    w, v = x.reshape(8192, 32768), jnp.ones((1, 8192), jnp.float32)
    gemv = jax.jit(lambda v, w: v @ w)
    gemv(v, w).block_until_ready()
    t_gemv = P.best_time(lambda: gemv(v, w).block_until_ready(), 5)
    tw, tv = ta.view(32768, 8192), torch.ones(1, 8192)  # torch's Linear layout [out, in]
    t_tgemv = P.best_time(lambda: torch.nn.functional.linear(tv, tw), 5)
    half = a[: 2**27]
    t_copy = P.best_time(lambda: half.copy(), 5)
    del x, w
    out = {"jnp_sum_read_GBps": a.nbytes / t_jnp, "torch_sum_read_GBps": a.nbytes / t_torch,
           "xla_gemv_read_GBps": a.nbytes / t_gemv, "torch_gemv_read_GBps": a.nbytes / t_tgemv}
    out = {k: round(v / 1e9, 2) for k, v in out.items()}
    out["read_GBps"] = max(out.values())
    out["numpy_copy_read_plus_write_GBps"] = round(2 * half.nbytes / t_copy / 1e9, 2)
    return out


def prefilled_decode(model, batch: dict, new_tokens: int, pad_id: int):
    """(progs, params, sp, stop, prefilled): `loop.programs` for the model (made now, so under the current
    `row_dots.ENABLED`), its generation params, greedy sampling, a stop at `new_tokens` with no end token, and a
    function that returns a freshly prefilled DecodeState of `batch` (each call prefills again: the decode programs
    donate their state)."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    progs = loop.programs(model.config, sampling.Sampler(), None)
    params, sp = weights.generation_params(model), sampling.SamplingParams.create()
    stop = loop.StopParams(eos=jnp.full((4,), -1, jnp.int32), pad=jnp.int32(pad_id),
                           max_new_tokens=jnp.int32(new_tokens))
    inputs = place(prepare_inputs(model, batch, new_tokens)[0], None)
    gen_len = kv_cache.gen_buffer_length(new_tokens)
    prefilled = lambda: jax.block_until_ready(progs.prefill(params, inputs, jax.random.key(0), sp, stop, gen_len))
    return progs, params, sp, stop, prefilled


def paired_roofline(model, batch, steps: int, rounds: int, weight_bytes: int, pad_id: int) -> dict:
    """Batch-1 decode against a roofline measured beside it: `rounds` times, the bandwidth (`measure_bandwidth`)
    right before one timed call of the compiled decode loop (`steps` steps from a prefilled state: one measured
    interval, no difference of two lengths, so a hiccup can only lower a rate, never raise it). This host's speed
    drifts by up to 2x within minutes, so a fraction of a bandwidth measured minutes apart mixes two machines (one
    such run read 160%); each round here compares the two within seconds. Every round and the median fraction."""
    import jax

    progs, params, sp, stop, prefilled = prefilled_decode(model, batch, steps + 1, pad_id)
    jax.block_until_ready(progs.decode(params, prefilled(), sp, stop))  # compile
    out = []
    for _ in range(rounds):
        read = measure_bandwidth()["read_GBps"]
        state = prefilled()
        t0 = time.perf_counter()
        jax.block_until_ready(progs.decode(params, state, sp, stop))
        rate = steps / (time.perf_counter() - t0)
        out.append({"read_GBps": read, "ours_tokens_per_s": round(rate, 2),
                    "fraction_of_roofline": round(rate * weight_bytes / (read * 1e9), 3)})
    fractions = sorted(r["fraction_of_roofline"] for r in out)
    return {"rounds": out, "median_fraction_of_roofline": fractions[len(fractions) // 2], "decode_steps": steps,
            "method": "per round: bandwidth (best of jnp / torch sums and gemvs over 1 GiB), then one timed call of "
                      "the decode-loop program from a prefilled state; fraction = tokens/s x weight bytes / bandwidth"}

"""The serving programs' attention in blocks (`serving/block_attention.py`) against the masked full-cache attention,
side by side in one process on bench_serve's 117M shape and its 64-token engine (16 slots, C = 64, S = 448), calls
alternating form by form:

- `chunk`: 16 rows of the prefill chunks of bench_serve's ~250-token one-image prompt, at the starts its chunks have
  (0, 64, 128 and 206 with C = 64 tokens, 192 with C/4: the few before the image's end), and their sum (one
  16-prompt prefill);
- `decode`: one 16-slot decode call (N = 1) with every row at position 300 (5 of the 7 blocks used).

Each form's results against the other: the chunk's KV block and picked log-probabilities (max abs difference: the
forms round differently), and within the block form the target row's bits alone (beside padding rows) and beside 15
rows (equal: batch invariance).

    flock /work/wt/bench.lock python benchmarks/serve_block_attention.py   # -> results/serve_block_attention.json
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torchvision_ops  # noqa: E402

torchvision_ops.ensure_importable()

import numpy as np  # noqa: E402

CHUNKS = ((0, 64), (64, 64), (128, 64), (192, 16), (206, 64))  # (start, chunk length) of bench_serve's prompt


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="serve_block_attention.json", help="file name in benchmarks/results")
    args = parser.parse_args()
    import bench_serve
    import jax
    import jax.numpy as jnp

    import deepseek_vl_jax as D
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving import Engine, EngineConfig, programs

    path = bench_serve.build_checkpoint("/tmp/dsvl_bench_serve", 8, 1024, 16, 2816)
    model, proc = D.load_pretrained(path, progress=False), load_processor(path)
    engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=64, max_seq_len=384))
    s, d, vocab = engine.shapes, model.config.text.hidden_size, model.config.text.vocab_size
    result = {"shape": "bench_serve's 117M (LLaMA 8x1024, SigLIP 6x384), float32; engine 16 slots, C = 64, "
                       f"S = {s.seq_len}, attention block {s.attention_block}", "uptime_start": bench_serve.uptime(),
              "rounds": args.rounds}
    forms = {"plain": programs.Programs(model.config, model.mesh, s, blocked=()),
             "blocks": programs.Programs(model.config, model.mesh, s, blocked=("chunk", "decode"))}
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), engine.cache)
    params = engine._slot_params([None] * 16)
    calls = []
    for start, c in CHUNKS:
        pieces = [(slot, rng.integers(3, vocab, c).astype(np.int32), rng.normal(size=(c, d)).astype(np.float32),
                   rng.random(c) < 0.5, start) for slot in range(16)]
        calls.append((f"start={start},C={c}", programs.chunk_rows(s, c, d, pieces, 16)))
    times = {k: {name: [] for name, _ in calls} for k in forms}
    bits = {}
    for i in range(args.rounds + 1):  # round 0 compiles and keeps each call's results
        for name, arrays in calls:
            for form, progs in forms.items():
                cache = jax.tree.map(jnp.copy, base)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                cache, picked = progs.chunk(engine.params, cache, *arrays, params)
                jax.block_until_ready((cache, picked))
                if i:
                    times[form][name].append(time.perf_counter() - t0)
                else:
                    slots, starts, c = arrays[0], arrays[4], arrays[1].shape[1]
                    block = [np.stack([np.asarray(x)[sl, ..., st:st + c] if x.shape[-1] == s.seq_len else
                                       np.asarray(x)[sl, :, st:st + c] for sl, st in zip(slots, starts)])
                             for x in jax.tree.leaves(cache)]
                    bits[(form, name)] = (block, np.asarray(picked.logprob), np.asarray(picked.token))
                del cache
    out = {}
    for name, arrays in calls:
        (kv_a, lp_a, tok_a), (kv_b, lp_b, tok_b) = bits[("plain", name)], bits[("blocks", name)]
        out[name] = {form: {"median_s": float(np.median(t[name])), "min_s": float(np.min(t[name]))}
                     for form, t in times.items()}
        out[name]["blocks_vs_plain_paired_median"] = float(np.median(
            np.array(times["blocks"][name]) / np.array(times["plain"][name])))
        out[name]["max_abs_diff"] = {"kv": float(max(np.abs(a - b).max() for a, b in zip(kv_a, kv_b))),
                                     "logprob": float(np.abs(lp_a - lp_b).max()),
                                     "same_tokens": bool(np.array_equal(tok_a, tok_b))}
        print(name, json.dumps(out[name]), flush=True)
    total = {form: sum(out[name][form]["median_s"] for name, _ in calls) for form in forms}
    out["sum: one 16-prompt prefill"] = {**{f: {"median_s": v} for f, v in total.items()},
                                         "blocks_vs_plain": total["blocks"] / total["plain"]}
    print(json.dumps(out["sum: one 16-prompt prefill"]), flush=True)
    result["chunk_call_s"] = out
    result["chunk_batch_invariance"] = invariance(engine, forms["blocks"], base, params, rng)
    print(json.dumps(result["chunk_batch_invariance"]), flush=True)
    result["decode_call_s"] = decode(engine, forms, base, args.rounds)
    print(json.dumps(result["decode_call_s"]), flush=True)
    result["uptime_end"] = bench_serve.uptime()
    dest = os.path.join(ROOT, "benchmarks", "results", args.out)
    with open(dest, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", dest)


def invariance(engine, progs, base, params, rng) -> dict:
    """The block form's target row (slot 5, start 64: needs 1 block) alone beside padding rows and beside 15 rows at
    start 206 (4 blocks): the same KV block and log-probabilities."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.serving import programs

    s, d, vocab = engine.shapes, engine.model.config.text.hidden_size, engine.model.config.text.vocab_size
    piece = lambda slot, start: (slot, rng.integers(3, vocab, 64).astype(np.int32),
                                 rng.normal(size=(64, d)).astype(np.float32), rng.random(64) < 0.5, start)
    target = piece(5, 64)
    others = [piece(slot, 206) for slot in range(16) if slot != 5]
    got = []
    for pieces in ([target], [target] + others):
        cache, picked = progs.chunk(engine.params, jax.tree.map(jnp.copy, base),
                                    *programs.chunk_rows(s, 64, d, pieces, 16), params)
        kv = [np.asarray(x)[5, ..., 64:128] if x.shape[-1] == s.seq_len else np.asarray(x)[5, :, 64:128]
              for x in jax.tree.leaves(cache)]
        got.append((kv, np.asarray(picked.logprob)[0]))
    (kv_a, lp_a), (kv_b, lp_b) = got
    return {"alone_vs_beside_15_longer_rows_bitwise": bool(all(np.array_equal(a, b) for a, b in zip(kv_a, kv_b))
                                                          and lp_a == lp_b)}


def decode(engine, forms, base, rounds) -> dict:
    import jax

    from deepseek_vl_jax.serving import programs

    b = engine.shapes.slots
    full = lambda v: np.full(b, v, np.int32)
    state = programs.DecodeState(token=full(5), position=full(300), counter=full(1), remaining=full(10 ** 6),
                                 active=np.ones(b, bool))
    params, eos = engine._slot_params([None] * b), np.array([-1], np.int32)
    times, logprobs = {k: [] for k in forms}, {}
    caches = {k: jax.tree.map(lambda x: x.copy(), base) for k in forms}
    for i in range(4 * rounds + 2):
        for form, progs in forms.items():
            t0 = time.perf_counter()
            caches[form], _, picked, _ = progs.decode(engine.params, caches[form], state, np.zeros(b, bool), state,
                                                      params, eos)
            jax.block_until_ready(picked)
            if i >= 2:
                times[form].append(time.perf_counter() - t0)
            else:
                logprobs[form] = np.asarray(picked.logprob)
    out = {form: {"median_s": float(np.median(t))} for form, t in times.items()}
    out["blocks_vs_plain_paired_median"] = float(np.median(np.array(times["blocks"]) / np.array(times["plain"])))
    out["max_abs_diff_logprob"] = float(np.abs(logprobs["blocks"] - logprobs["plain"]).max())
    out["position"], out["cache_slots_S"] = 300, engine.shapes.seq_len
    return out


if __name__ == "__main__":
    main()

"""The serving `chunk` (prefill) program's forms side by side in one process, on bench_serve's 117M shape and its
64-token engine (16 slots, C = 64, S = 448): R = 16 rows of a full C-token chunk and of a C/4 chunk, each row the
third block of a prompt; programs alternating call by call. Forms:

- `whole_rows`: the form before this file (gathers the R cache rows, runs them, scatters the whole rows back);
- `vmapped`: the form before `blocks` took its rows in turn (the R rows gathered and run under `vmap`, so every
  dot has R * C rows; only each row's C-slot block written back);
- `blocks`: the engine's (the rows in turn, `lax.map`: each reads its own cache row and only its own attention
  blocks, a padding row computes nothing; only each row's C-slot block written back);
- each with the decode programs' CPU options (YNNPACK dots off) and with `generate`'s prompt options (XLA's
  defaults: YNNPACK dots on).

Also offline `generate`'s prefill of the 16 bench chats (one batch, max_new_tokens=1) for scale, and a check that
every form writes the same cache bits and picks the same tokens as `blocks` with the engine's options.

    flock /work/wt/bench.lock python benchmarks/serve_chunk_forms.py   # -> benchmarks/results/serve_chunk_forms.json
    ... serve_chunk_forms.py --forms blocks --rounds 8 --no-offline --out NAME.json   # options A/B only
"""

from __future__ import annotations

import functools
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



def whole_rows_chunk(self, params, cache, slots, ids, feats, is_image, starts, n_valid, p):
    """The `Programs._chunk` of before: the R rows gathered, run and scattered back whole."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.serving import programs as P

    axis = P._batch_axis(cache)
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=axis, mode="clip"), cache)
    run = jax.vmap(functools.partial(self._chunk_row, params), in_axes=(axis, 0, 0, 0, 0, 0), out_axes=(0, axis))
    last, rows = run(rows, ids, feats, is_image, starts, n_valid)
    index = (slice(None),) * axis + (slots,)
    cache = jax.tree.map(lambda x, r: x.at[index].set(r.astype(x.dtype), mode="drop"), cache, rows)
    return self._constrain(cache), self._pick_last(params, last, p)


def vmapped_chunk(self, params, cache, slots, ids, feats, is_image, starts, n_valid, p):
    """The `Programs._chunk` before its rows ran in turn: the R rows gathered and run under `vmap`."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.serving import programs as P

    axis = P._batch_axis(cache)
    rows = jax.tree.map(lambda x: jnp.take(x, slots, axis=axis, mode="clip"), cache)
    run = jax.vmap(functools.partial(self._chunk_block, params), in_axes=(axis, 0, 0, 0, 0, 0))
    with self._attention("chunk", starts):
        last, blocks = run(rows, ids, feats, is_image, starts, n_valid)
    cache = P._write_blocks(cache, blocks, slots, starts)
    return self._constrain(cache), self._pick_last(params, last, p)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="blocks,vmapped,whole_rows")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-offline", action="store_true", help="skip offline generate's prefill")
    parser.add_argument("--out", default="serve_chunk_forms.json", help="file name in benchmarks/results")
    args = parser.parse_args()
    import bench_serve
    import jax
    import jax.numpy as jnp

    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import generate, loop
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving import Engine, EngineConfig, programs
    from deepseek_vl_jax.serving.media import MediaLimits, load_image

    path = bench_serve.build_checkpoint("/tmp/dsvl_bench_serve", 8, 1024, 16, 2816)
    model, proc = D.load_pretrained(path, progress=False), load_processor(path)
    engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=64, max_seq_len=384))
    s, d = engine.shapes, model.config.text.hidden_size
    result = {"shape": "bench_serve's 117M (LLaMA 8x1024, SigLIP 6x384), float32; engine 16 slots, C = 64, "
                       f"S = {s.seq_len}; R = 16 rows, each the third block of a prompt",
              "uptime_start": bench_serve.uptime(), "rounds": args.rounds}
    options = {"decode_options": loop.compiler_options(), "prompt_options": loop.compiler_options(16, prompt=True)}
    forms = {}
    for name, opts in options.items():
        for form in args.forms.split(","):
            progs = programs.Programs(model.config, model.mesh, s, compiler_options=opts)
            other = {"whole_rows": whole_rows_chunk, "vmapped": vmapped_chunk}.get(form)
            if other is not None:
                progs.chunk = jax.jit(progs._counted("chunk", functools.partial(other, progs)),
                                      donate_argnums=1, compiler_options=opts)
            forms[f"{form}/{name}"] = progs
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), engine.cache)
    out = {}
    for c, r in ((s.chunk, 16), (s.small_chunk, 16), (s.chunk, 2)):
        pieces = [(slot, rng.integers(3, model.config.text.vocab_size, c).astype(np.int32),
                   rng.normal(size=(c, d)).astype(np.float32), rng.random(c) < 0.5, 2 * s.chunk)
                  for slot in range(16 if r == 16 else 1)]  # R = 2: one request, one padding row
        arrays = programs.chunk_rows(s, c, d, pieces, r)
        params = engine._slot_params([None] * r)
        times, bits = {k: [] for k in forms}, {}
        for i in range(args.rounds + 1):
            for name, progs in forms.items():
                cache = jax.tree.map(jnp.copy, base)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                cache, picked = progs.chunk(engine.params, cache, *arrays, params)
                jax.block_until_ready((cache, picked))
                if i:
                    times[name].append(time.perf_counter() - t0)
                else:
                    bits[name] = [np.asarray(x) for x in jax.tree.leaves((cache, picked))]
                del cache
        ref = bits["blocks/decode_options"]
        key = f"C={c}" + ("" if r == 16 else f", R={r} (one request)")
        out[key] = {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)),
                                "same_bits_as_engine": all(np.array_equal(a, b) for a, b in zip(ref, bits[name])),
                                # paired by round (the calls of a round run back to back): robust to slow drifts
                                "median_ratio_to_engine": float(np.median(
                                    np.array(t) / np.array(times["blocks/decode_options"])))}
                         for name, t in times.items()}
        print(key, json.dumps(out[key]), flush=True)
    result["chunk_call_s"] = out
    if args.no_offline:
        return finish(result, args.out)
    chats = [[{"role": "user", "content": [{"type": "image", "image": load_image(bench_serve.image_url(16000 + i),
                                                                                MediaLimits(), "x")},
                                           {"type": "text", "text": bench_serve.QUESTION}]}] for i in range(16)]
    batch = proc(chats, add_generation_prompt=True, padding_side="left")
    generate(model, batch, max_new_tokens=1, eos_token_id=-1)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(model, batch, max_new_tokens=1, eos_token_id=-1)
        runs.append(time.perf_counter() - t0)
    result["offline_prefill_16_chats_s"] = {"min_s": min(runs), "prompt_tokens": int(batch["input_ids"].shape[1]),
                                            "note": "generate(max_new_tokens=1), images encoded inside"}
    print(json.dumps(result["offline_prefill_16_chats_s"]), flush=True)
    finish(result, args.out)


def finish(result: dict, name: str) -> None:
    import bench_serve

    result["uptime_end"] = bench_serve.uptime()
    dest = os.path.join(ROOT, "benchmarks", "results", name)
    with open(dest, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", dest)


if __name__ == "__main__":
    main()

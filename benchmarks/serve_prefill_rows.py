"""Does the engine's batched prefill give a request the same bits whatever the row count R and its neighbours? The
serving `chunk` program (serving/programs.py) over R = 1, 2, 4, 8, 16 request rows, float32, the serving compiler
options, on the tiny DeepSeek-VL and DeepSeek-VL-Hybrid of tests/serving_fixtures and on bench_serve's 117M shape.
A target row of a full or a C/4 chunk (the third block of a prompt, image features at some positions, attending to 2C random cached slots) is
run beside padding rows and beside other random requests, at the first and last row; its written KV row and its
picked token's log-probabilities are compared bitwise with R = 2 beside a padding row. For the tiny model, the dot
shapes of the compiled R = 1 and R = 2 programs (R = 1 folds the row axis away; the LM head, a matrix-vector dot at
R = 1 and a different kernel at R = 2, 4 vs 8, 16 on the 117M shape, made the rows differ until the program ran it
over a fixed number of rows).

    python benchmarks/serve_prefill_rows.py   # -> benchmarks/results/serve_prefill_rows.json (no timing: no lock)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torchvision_ops  # noqa: E402

torchvision_ops.ensure_importable()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROWS = (1, 2, 4, 8, 16)


def check(engine, c: int, seed: int = 0) -> dict:
    progs, s = engine.programs, engine.shapes
    d, vocab = engine.model.config.text.hidden_size, engine.model.config.text.vocab_size
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(engine.cache)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    base = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    axis = 1 if isinstance(engine.cache[0], jax.Array) else 0

    def piece(slot, start, m):
        return (slot, rng.integers(3, vocab, m), rng.normal(size=(m, d)), rng.random(m) < 0.5, start)

    def run(rows):
        r = len(rows)
        slots = np.full(r, s.slots, np.int32)
        ids, im, feats = np.zeros((r, c), np.int32), np.zeros((r, c), bool), np.zeros((r, c, d), np.float32)
        starts, valid = np.zeros(r, np.int32), np.ones(r, np.int32)
        for i, row in enumerate(rows):
            if row is not None:
                slot, pid, pf, pim, start = row
                m = len(pid)
                slots[i], starts[i], valid[i] = slot, start, m
                ids[i, :m], feats[i, :m], im[i, :m] = pid, pf, pim
        args = (engine.params, jax.tree.map(jnp.copy, base), slots, ids, feats, im, starts, valid,
                engine._slot_params([None] * r))
        cache, picked = progs.chunk(*args)
        return [np.take(np.asarray(x), target[0], axis=axis) for x in jax.tree.leaves(cache)], \
            [np.asarray(x) for x in (picked.logprob, picked.top_logprobs)], args

    target = piece(5, 2 * s.chunk, max(1, c - 3))
    others = lambda r: [piece(slot, int(rng.integers(0, 3)) * s.chunk, int(rng.integers(1, c + 1)))
                        for slot in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)[:r - 1]]
    ref_kv, ref_lp, _ = run([target, None])
    out = {}
    for r in ROWS:
        for name, rows in (("padding", [target] + [None] * (r - 1)), ("requests, target first", [target] + others(r)),
                           ("requests, target last", others(r) + [target])):
            if r == 1 and name != "padding":
                continue
            kv, lp, args = run(rows)
            at = rows.index(target)
            kv_diff = max(float(np.abs(a - b).max()) for a, b in zip(kv, ref_kv))
            lp_diff = max(float(np.abs(a[at] - b[0]).max()) for a, b in zip(lp, ref_lp))
            out[f"R={r}, {name}"] = {"bitwise_equal_to_R2": kv_diff == 0 and lp_diff == 0, "kv_max_diff": kv_diff,
                                     "logprob_max_diff": lp_diff}
            print(r, name, out[f"R={r}, {name}"], flush=True)
            if r in (1, 2) and name == "padding" and c <= 16:
                hlo = progs.chunk.lower(*args).compile().as_text()
                out[f"R={r}, {name}"]["dot_shapes"] = sorted(set(re.findall(r"= (f32\[[0-9,]*\])[^\n]* dot\(", hlo)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-checkpoint", default="/tmp/dsvl_bench_serve", help="bench_serve's 117M checkpoint")
    parser.add_argument("--skip-bench-shape", action="store_true")
    args = parser.parse_args()
    import bench_serve
    import serving_fixtures as S

    import deepseek_vl_jax as D
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving import Engine, EngineConfig

    models = [("tiny DeepSeek-VL (tests/serving_fixtures), chunk 16", S.build_model_dir(tempfile.mkdtemp(), "vl"), 16),
              ("tiny DeepSeek-VL-Hybrid (tests/serving_fixtures), chunk 16",
               S.build_model_dir(tempfile.mkdtemp(), "hybrid"), 16)]
    if not args.skip_bench_shape:
        models.append(("bench_serve's 117M DeepSeek-VL, chunk 64",
                       bench_serve.build_checkpoint(args.bench_checkpoint, 8, 1024, 16, 2816), 64))
    result = {"what": __doc__.splitlines()[0], "float32": True, "models": {}}
    for name, path, chunk in models:
        model, proc = D.load_pretrained(path, progress=False), load_processor(path)
        engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=chunk, max_seq_len=256))
        print(name, flush=True)
        result["models"][name] = {f"chunk {c}": check(engine, c) for c in (chunk, engine.shapes.small_chunk)}
        del engine
    result["every_R_bitwise_equal"] = all(v["bitwise_equal_to_R2"] for m in result["models"].values()
                                          for byc in m.values() for v in byc.values())
    out_path = os.path.join(ROOT, "benchmarks", "results", "serve_prefill_rows.json")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out_path)


if __name__ == "__main__":
    main()

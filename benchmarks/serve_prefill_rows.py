"""Does a multi-request prefill give each request the same bits whatever the row count? The engine's chunk program
vmapped over R requests (R = 1, 2, 3, 4, 8; same chunk of C tokens per row, each into its own cache row), on the tiny
serving test model, float32, with the serving programs' compiler options (YNNPACK's dot fusion off) and without.
For each R: whether rows 0 and 1 equal their values at R = 2 and row 0 its value at R = 1, the max difference, and
the dot shapes of the compiled program (where a size-1 row axis is folded away).

    python benchmarks/serve_prefill_rows.py   # -> benchmarks/results/serve_prefill_rows.json (no timing: no lock)
"""

from __future__ import annotations

import functools
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


def main() -> None:
    import serving_fixtures as S

    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import loop
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving import Engine, EngineConfig

    path = S.build_model_dir(tempfile.mkdtemp(), "vl")
    model, proc = D.load_pretrained(path, progress=False), load_processor(path)
    engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=16, max_seq_len=256))
    programs, c, d = engine.programs, 16, model.config.text.hidden_size
    ids = np.random.default_rng(0).integers(3, 100, (8, c)).astype(np.int32)

    def row(params, cache, slot, ids, start):
        return programs._chunk(params, cache, slot, ids, jnp.zeros((c, d)), jnp.zeros(c, bool), start, jnp.int32(c))[1]

    def many(params, cache, slots, ids, starts):
        return jax.vmap(functools.partial(row, params, cache))(slots, ids, starts)

    result = {"model": "tests/serving_fixtures vl (tiny), float32, chunk of 16 tokens per row", "variants": {}}
    for name, opts in (("ynn fusion off (serving's options)", loop.compiler_options()), ("ynn default", {})):
        f = jax.jit(many, compiler_options=opts)
        args = lambda r: (engine.params, engine.cache, jnp.arange(r, dtype=jnp.int32), jnp.asarray(ids[:r]),
                          jnp.zeros(r, jnp.int32))
        out = {r: np.asarray(f(*args(r))) for r in (1, 2, 3, 4, 8)}
        rows = {}
        for r in (1, 2, 3, 4, 8):
            dots = re.findall(r"= (f32\[[0-9,]*\])[^\n]* dot\(", f.lower(*args(r)).compile().as_text())
            rows[r] = {"row0_equals_R1": bool(np.array_equal(out[r][0], out[1][0])),
                       "max_diff_row0_vs_R1": float(np.abs(out[r][0] - out[1][0]).max()),
                       "rows01_equal_R2": None if r == 1 else bool(np.array_equal(out[r][:2], out[2][:2])),
                       "dot_shapes": sorted(set(dots))}
        result["variants"][name] = rows
        print(name, json.dumps({r: {k: v for k, v in x.items() if k != "dot_shapes"} for r, x in rows.items()}))
    out_path = os.path.join(ROOT, "benchmarks", "results", "serve_prefill_rows.json")
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out_path)


if __name__ == "__main__":
    main()

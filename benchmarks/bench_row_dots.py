"""One-row Dense layers as blocked dots (`deepseek_vl_jax.generation.row_dots`) against one XLA dot, side by side in
one process.

    python benchmarks/bench_row_dots.py [--rounds 5] [--checkpoint /tmp/dsvl_bench_045b]

- `products`: GB/s of weight read of decode-shaped products x [B, K] @ kernel [K, N] in a chain of distinct
  kernels (as a decode step streams them from memory, not from the cache), YNNPACK dots off as in the decoding
  programs: one dot over the [in, out] kernel (what flax stores), one over a [out, in] copy (torch's layout), and
  the kernel's rows in `row_dots.BLOCKS` blocks; at 1, 2, 4 and 8 rows; also pinned to one core (`taskset`), where
  the plain dot keeps its speed if it runs on one thread.
- `decode_step`: ms of the batch-1 decode step program of bench_generate.py's 0.45B checkpoint (1 image + 40 text
  tokens, ~650 cache slots) with `row_dots.ENABLED` on and off (each its own programs), and the greedy tokens of
  both; the variants alternate round by round (order reversed every round), figures are medians.
Writes benchmarks/results/row_dots.json under this machine's key (`generate_profile.machine_key`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import generate_profile as P  # noqa: E402

OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
SHAPES = ((1024, 2816, 40), (2816, 1024, 40), (1024, 1024, 96), (1024, 102400, 2))  # K, N, kernels in the chain


def _median_rounds(programs: dict, rounds: int, samples: int = 5) -> dict:
    """name -> (fn, args): median over rounds of the best of `samples` calls; order reversed every round."""
    times = {n: [] for n in programs}
    names = list(programs)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            fn, a = programs[n]
            fn(*a).block_until_ready()
            times[n].append(P.best_time(lambda: fn(*a).block_until_ready(), samples))
    return {n: statistics.median(v) for n, v in times.items()}


def chain(mv):
    """x, kernels -> x after each product mv(x, w) in turn (a dependent chain: no product can be skipped)."""
    def f(x, kernels):
        for w in kernels:
            x = x + mv(x, w).sum(-1, keepdims=True) * 1e-6
        return x
    return f


def products(rounds: int, rows_list=(1, 2, 4, 8)) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_vl_jax.generation.row_dots import BLOCKS

    out = {}
    rng = np.random.default_rng(0)
    for k, n, count in SHAPES:
        ws = [jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)) for _ in range(count)]
        wt = [w.T.copy() for w in ws]
        nbytes = 4 * k * n * count

        forms = {
            "one dot, [in, out]": (lambda x, w: x @ w, ws),
            "one dot, [out, in] copy": (lambda x, w: jnp.einsum("bi,oi->bo", x, w), wt),
            f"{BLOCKS} blocks, [in, out]": (lambda x, w: jnp.einsum(
                "bgk,gkn->bgn", x.reshape(x.shape[0], BLOCKS, k // BLOCKS), w.reshape(BLOCKS, k // BLOCKS, n)).sum(1),
                ws),
        }
        for rows in rows_list if n < 100000 else (1,):
            x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
            progs = {name: (jax.jit(chain(mv)).lower(x, a).compile(OFF), (x, a)) for name, (mv, a) in forms.items()}
            t = _median_rounds(progs, rounds)
            out[f"{k}x{n}, {rows} row{'s' if rows > 1 else ''}"] = {name: round(nbytes / v / 1e9, 1)
                                                                   for name, v in t.items()}
            print(f"{k}x{n} rows={rows}: " + ", ".join(f"{a} {b} GB/s" for a, b in
                                                       out[f"{k}x{n}, {rows} row{'s' if rows > 1 else ''}"].items()),
                  flush=True)
    return out


def decode_step(checkpoint: str, rounds: int) -> dict:
    import jax
    import numpy as np

    import bench_generate as B
    import deepseek_vl_jax as D
    from decode_rates import prefilled_decode
    from deepseek_vl_jax.generation import loop, row_dots

    model = D.load_pretrained(checkpoint, progress=False)
    variants = {}
    for enabled in (True, False):
        row_dots.ENABLED = enabled
        loop.programs.cache_clear()
        variants["blocks" if enabled else "one dot"] = prefilled_decode(model, B.image_batch(40), 48,
                                                                        B.TEXT["pad_token_id"])
    row_dots.ENABLED = True
    loop.programs.cache_clear()
    times, tokens, steps = {n: [] for n in variants}, {}, 16
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            progs, params, sp, stop, prefilled = variants[name]
            state = prefilled()
            for _ in range(2):
                state = progs.step(params, state, sp, stop)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for _ in range(steps):
                state = progs.step(params, state, sp, stop)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - t0) / steps)
            tokens[name] = np.asarray(state.tokens)
    ms = {n: round(statistics.median(v) * 1e3, 1) for n, v in times.items()}
    print(f"batch-1 decode step: {ms} ms", flush=True)
    return {"ms_per_step": ms, "speedup_blocks_over_one_dot": round(ms["one dot"] / ms["blocks"], 3),
            "same_greedy_tokens": bool((tokens["blocks"] == tokens["one dot"]).all()),
            "samples_ms": {n: [round(v * 1e3, 1) for v in t] for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b")
    parser.add_argument("--products-only", action="store_true")
    parser.add_argument("--one-core", action="store_true", help="(internal) the products pinned to one core")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "row_dots.json"))
    args = parser.parse_args()
    if args.one_core:
        print(json.dumps(products(args.rounds, rows_list=(1,))))
        return
    import bench_generate as B

    info = P.machine()
    start = time.perf_counter()
    result = {"benchmark": "benchmarks/bench_row_dots.py", "machine": info, "rounds": args.rounds,
              "load_average_at_start": list(os.getloadavg())}
    result["products_GBps"] = products(args.rounds)
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--one-core", "--rounds",
                             str(args.rounds)], capture_output=True, text=True, check=True)
    result["products_GBps_one_core"] = json.loads(pinned.stdout.strip().splitlines()[-1])
    if not args.products_only:
        B.build_checkpoint(args.checkpoint)
        result["decode_step_batch1"] = decode_step(args.checkpoint, args.rounds)
    result["load_average_at_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    data = {"benchmark": result["benchmark"], "keyed_by": "generate_profile.machine_key", "machines": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
    data["machines"][P.machine_key(info)] = result
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()

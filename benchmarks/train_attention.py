"""One decoder layer's causal attention, forward + backward, at bench_train.py's shape (batch 2 x 632 tokens, 16
heads of 64), for the variants of `attention_grad` side by side in one process, their runs interleaved.

    python benchmarks/train_attention.py [--rounds 20] [--out benchmarks/results/train_attention.json]

A filter before `train_ab.py` (the whole step): each variant's median time of `jax.vjp` + pullback, and its
compiled temporaries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import os
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_vl_jax import attention_grad  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tokens", type=int, default=632)
    p.add_argument("--variants", default="recompute:128,keep:128,keep:256,keep:632,recompute:256,recompute:632")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    b, t, n, h = 2, args.tokens, 16, 64
    rng = np.random.default_rng(0)
    q, k, v, d = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(4))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None, None])
    fns, temps = {}, {}
    for name in args.variants.split(","):
        kind, block = name.split(":")

        def run(q, k, v, d, kind=kind, block=int(block)):
            f = lambda q, k, v: attention_grad.causal_attention(q, k, v, mask, h**-0.5, block,
                                                                keep_probs=kind == "keep")
            out, pull = jax.vjp(f, q, k, v)
            return out, pull(d)

        fns[name] = jax.jit(run).lower(q, k, v, d).compile()
        temps[name] = fns[name].memory_analysis().temp_size_in_bytes
        jax.block_until_ready(fns[name](q, k, v, d))
    ref = fns[next(iter(fns))](q, k, v, d)
    for name, f in fns.items():  # the variants agree
        got = f(q, k, v, d)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert float(jnp.max(jnp.abs(x - y))) <= 1e-4 * float(jnp.max(jnp.abs(y))), name
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v, d))
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    first = next(iter(med))
    result = {"shape": {"batch": b, "tokens": t, "heads": n, "head_dim": h}, "uptime_at_start": uptime,
              "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "rounds": args.rounds, "median_ms": {n: round(m, 2) for n, m in med.items()},
              "speedup_vs_first": {n: round(med[first] / m, 3) for n, m in med.items()},
              "temp_mb": {n: round(x / 2**20, 1) for n, x in temps.items()}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

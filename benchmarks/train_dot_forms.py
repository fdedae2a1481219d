"""The decoder's dots of a LoRA train step (bench_train.py's 0.45B shape, 1264 tokens) in each operand form XLA:CPU
can be handed, against torch's matmul on the same shapes, interleaved, best of `--reps` (load only slows a run):

    NN: x [M, I] @ W [I, O]        (this package's kernels [in, out]: the forward pass)
    NT: x [M, I] @ W [O, I]^T      (torch's nn.Linear weight [out, in]: its forward pass; ours: dx = dy W^T)

    python benchmarks/train_dot_forms.py [--reps 15] [--out benchmarks/results/train_dot_forms.json]

GFLOP/s per (shape, form, framework); torch with its own thread count (2 on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
M = 1264  # tokens of bench_train's batch
SHAPES = {"q/k/v/o": (1024, 1024), "gate/up": (1024, 2816), "down": (2816, 1024), "qkv fused": (1024, 3072),
          "gate_up fused": (1024, 5632)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import bench_train

    bench_train.import_transformers()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rng = np.random.default_rng(0)
    forms = {"NN": "mi,io->mo", "NT": "mi,oi->mo"}
    result = {}
    for name, (i, o) in SHAPES.items():
        x = rng.standard_normal((M, i), dtype=np.float32)
        w = rng.standard_normal((i, o), dtype=np.float32)
        runs = {}
        for form, eq in forms.items():
            wj = jnp.asarray(w if form == "NN" else w.T.copy())
            f = jax.jit(lambda a, b, eq=eq: jnp.einsum(eq, a, b))
            xj = jnp.asarray(x)
            runs[f"jax {form}"] = lambda f=f, xj=xj, wj=wj: f(xj, wj).block_until_ready()
            xt, wt = torch.from_numpy(x), torch.from_numpy(w if form == "NN" else w.T.copy())
            runs[f"torch {form}"] = (lambda xt=xt, wt=wt: xt @ wt) if form == "NN" else (lambda xt=xt, wt=wt: xt @ wt.T)
        best = {k: 1e9 for k in runs}
        for k, r in runs.items():
            r()
        for _ in range(args.reps):
            for k, r in runs.items():
                t = time.perf_counter()
                r()
                best[k] = min(best[k], time.perf_counter() - t)
        result[name] = {k: round(2 * M * i * o / v / 1e9, 1) for k, v in best.items()}
        print(name, result[name], flush=True)
    out = {"m": M, "reps": args.reps, "gflops_per_s_best": result, "torch_threads": torch.get_num_threads(),
           "uptime_at_start": uptime,
           "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""Eight-row decode products (a batch-8 decode step's Dense layers) in several dot forms and XLA:CPU options, beside
torch's `linear` over its own [out, in] weight, in one process: GB/s of weight read over a chain of distinct kernels
(streamed from memory, as a decode step reads them).

    python benchmarks/decode_rows8_forms.py [--rows 8] [--out benchmarks/results/decode_rows8_forms.json]

Forms over flax's [in, out] kernel, YNNPACK dots off (the decoding programs' options) unless named: one dot; the
transposed product `kn,bk->nb`; the kernel's rows in 2 or 4 blocks batched (row_dots' form); each row through
row_dots' 16 blocks; the output in 2 column halves; one dot with YNNPACK on; one dot with `xla_cpu_use_onednn`.
Writes the results under this machine's key (`generate_profile.machine_key`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import generate_profile as P  # noqa: E402
from bench_row_dots import OFF, chain  # noqa: E402

SHAPES = ((1024, 2816, 40), (2816, 1024, 40), (1024, 1024, 96))  # K, N, kernels in the chain


def measure(rows: int, rounds: int = 3) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    out = {}
    for k, n, count in SHAPES:
        ws_np = [rng.standard_normal((k, n), dtype=np.float32) for _ in range(count)]
        ws = [jnp.asarray(w) for w in ws_np]
        nbytes = 4 * k * n * count

        def blocks(g):
            return lambda x, w: jnp.einsum("bgk,gkn->bgn", x.reshape(x.shape[0], g, k // g),
                                           w.reshape(g, k // g, n)).sum(1)

        plain = lambda x, w: x @ w
        forms = {
            "one dot": (plain, OFF),
            "kn,bk->nb": (lambda x, w: jnp.einsum("kn,bk->nb", w, x).T, OFF),
            "2 row blocks": (blocks(2), OFF),
            "4 row blocks": (blocks(4), OFF),
            "each row in 16 blocks": (lambda x, w: jnp.concatenate(
                [blocks(16)(x[i:i + 1], w) for i in range(x.shape[0])]), OFF),
            "2 column halves": (lambda x, w: jnp.einsum("bk,kgn->bgn", x, w.reshape(k, 2, n // 2)).reshape(
                x.shape[0], n), OFF),
            "one dot, YNNPACK on": (plain, {}),
            "one dot, xla_cpu_use_onednn": (plain, {**OFF, "xla_cpu_use_onednn": True}),
        }
        x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
        res = {}
        for name, (mv, opts) in forms.items():
            c = jax.jit(chain(mv)).lower(x, ws).compile(opts)
            c(x, ws).block_until_ready()
            ts = [P.best_time(lambda: c(x, ws).block_until_ready(), 5) for _ in range(rounds)]
            res[name] = round(nbytes / statistics.median(ts) / 1e9, 1)
        wt = [torch.from_numpy(w.T.copy()) for w in ws_np]
        xt = torch.from_numpy(np.asarray(x))

        def tchain():
            y = xt
            with torch.no_grad():
                for w in wt:
                    y = y + torch.nn.functional.linear(y, w).sum(-1, keepdim=True) * 1e-6
            return y
        tchain()
        res["torch linear, [out, in]"] = round(nbytes / statistics.median(
            [P.best_time(tchain, 5) for _ in range(rounds)]) / 1e9, 1)
        out[f"{k}x{n}, {rows} rows"] = res
        print(f"{k}x{n} rows={rows}: {res}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode_rows8_forms.json"))
    args = parser.parse_args()
    info = P.machine()
    key = P.machine_key(info)
    data = json.load(open(args.out)) if os.path.exists(args.out) else {}
    data[key] = {"GBps_of_weight_read": measure(args.rows, args.rounds), "rows": args.rows, "machine": info,
                 "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    with open(args.out + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

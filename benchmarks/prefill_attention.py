"""One decoder layer's causal prompt attention (no gradient) at bench_generate.py's shape (a 617-token prompt in its
640-token bucket, 16 heads of 64), side by side in one process, runs interleaved:

- `tiles`: `layers.causal_attention` (query tiles walking key tiles with an online softmax; the form in use);
- `blocks`: `layers.heads_first_attention(causal=True)` (blocks of queries over all their keys, the form before);
- `torch_sdpa`: torch's `scaled_dot_product_attention(is_causal=True)` (what transformers' sdpa attention calls).

    python benchmarks/prefill_attention.py [--rows 1] [--rounds 30] [--out benchmarks/results/prefill_attention.json]

Reports each form's median milliseconds and the ratio torch / form (> 1: faster than torch), and checks the forms
agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.generate_profile import machine  # noqa: E402
from deepseek_vl_jax import layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--tokens", type=int, default=640)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    start = uptime()
    b, t, n, h = args.rows, args.tokens, 16, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(3))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None, None])
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    jax_forms = {
        "tiles": lambda q, k, v: layers.causal_attention(q, k, v, mask, h**-0.5),
        "blocks": lambda q, k, v: layers.heads_first_attention(q, k, v, mask, h**-0.5,
                                                               block=layers.prefill_block(t), causal=True),
    }
    compiled = {name: jax.jit(f).lower(jq, jk, jv).compile() for name, f in jax_forms.items()}
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))  # [B, N, T, H]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=h**-0.5)
    runs = {name: (lambda f=f: jax.block_until_ready(f(jq, jk, jv))) for name, f in compiled.items()}
    runs["torch_sdpa"] = sdpa
    ref = sdpa().transpose(1, 2).numpy()
    err = {name: float(np.max(np.abs(np.asarray(runs[name]()) - ref))) for name in compiled}
    for name, e in err.items():
        assert e < 1e-5, (name, e)
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(3):
            for f in runs.values():
                f()
        for _ in range(args.rounds):
            for name, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(x) * 1e3 for name, x in times.items()}
    result = {"shape": {"rows": b, "tokens": t, "heads": n, "head_dim": h}, "machine": machine(),
              "torch_threads": torch.get_num_threads(), "uptime_at_start": start, "uptime_at_end": uptime(),
              "rounds": args.rounds, "median_ms": {k: round(x, 2) for k, x in med.items()},
              "torch_over_form": {k: round(med["torch_sdpa"] / x, 3) for k, x in med.items()},
              "max_abs_error_vs_torch": err}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

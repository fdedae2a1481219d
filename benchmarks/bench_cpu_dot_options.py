"""Generation programs with and without `generation.loop.CPU_COMPILER_OPTIONS`, side by side in one process.

    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py [--rounds 2]

Same 0.45B checkpoint as bench_generate.py (built there once, cached in --checkpoint). Each variant compiles its own
prefill/generate programs (`generate(programs=...)`); rounds alternate the variants so they see the same load.
Writes benchmarks/results/cpu_dot_options.json: time to first token, batch-8 and batch-1 decode tokens/s per round,
whether the greedy tokens agree, the load averages.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_generate as B  # noqa: E402


def variant(opts: dict):
    from deepseek_vl_jax.generation import loop

    @functools.lru_cache(maxsize=None)
    def progs(config, sampler, mesh, extras=loop.Extras()):
        saved = loop.CPU_COMPILER_OPTIONS
        loop.CPU_COMPILER_OPTIONS = opts
        try:
            return loop.programs.__wrapped__(config, sampler, mesh, extras)
        finally:
            loop.CPU_COMPILER_OPTIONS = saved
    return progs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_dot_options.json"))
    args = parser.parse_args(argv)
    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import generate, loop

    B.build_checkpoint(args.checkpoint)
    model = D.load_pretrained(args.checkpoint, progress=False)
    variants = {"XLA defaults (YNNPACK dots)": variant({}), f"{loop.CPU_COMPILER_OPTIONS}": variant(
        dict(loop.CPU_COMPILER_OPTIONS))}
    img, b8 = B.image_batch(40), B.text_batch(8, 64, seed=1)
    run = lambda batch, n, p: generate(model, batch, max_new_tokens=n, eos_token_id=-1, programs=p)
    tokens = {k: run(img, 8, p) for k, p in variants.items()}
    first = next(iter(tokens.values()))
    result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "machine": B.P.machine(),
              "same_greedy_tokens": all(bool((t == first).all()) for t in tokens.values()), "rounds": []}
    for p in variants.values():
        run(b8, 8, p), run(b8, 24, p), run(img, 24, p)
    for _ in range(args.rounds):
        row = {}
        for name, p in variants.items():
            ttft = B.best_time(lambda: run(img, 1, p), 2)
            rates = {}
            for label, batch in (("batch8", b8), ("batch1", img)):
                t8, t24 = B.best_time(lambda: run(batch, 8, p), 2), B.best_time(lambda: run(batch, 24, p), 2)
                rates[f"{label}_tokens_per_s"] = round(batch["input_ids"].shape[0] * 16 / (t24 - t8), 2)
            row[name] = {"time_to_first_token_s": round(ttft, 3), **rates,
                         "load_average": [round(x, 2) for x in os.getloadavg()]}
            print(name, row[name], flush=True)
        result["rounds"].append(row)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

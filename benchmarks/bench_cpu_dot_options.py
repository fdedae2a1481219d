"""XLA:CPU dot paths for the generation programs, A/B side by side in one process: YNNPACK dots off vs on, per
batch size, and a batch-1 prompt program apart from its decode loop.

    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py [--rounds 5] [--isa avx2]

Same 0.45B checkpoint as bench_generate.py (built there once, cached in --checkpoint). Each variant compiles its own
programs (`generate(programs=...)`). Every round times every variant once per figure, in alternating order (ABC,
CBA, ...), so that they see the same load; figures are medians over the rounds (the same program moves by up to
1.5x run to run on a shared machine, so single runs decide nothing). Per variant: time to first token (1 image,
617-token prompt), batch-1 decode tokens/s on that prompt, batch-8 prompt time (8 x 64 text tokens) and batch-8
decode tokens/s. Decode rates are differences of 24- and 8-token generate calls (the prompt cancels).
Variants: `off` (YNNPACK dots off in every program), `on` (XLA's defaults), `policy` (`loop.CPU_DOT_POLICY`, what
generation uses), and `split`: a batch-1 prompt program with YNNPACK on, then the decode loop as a second program
with it off (is splitting worth its cost?). `--isa avx2` reruns itself with XLA limited to AVX2.
Writes benchmarks/results/cpu_dot_options.json, one entry per machine key (`generate_profile.machine_key`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_generate as B  # noqa: E402

FIGURES = ("time_to_first_token_s", "batch1_tokens_per_s", "batch8_prompt_s", "batch8_tokens_per_s")


def policy_programs(policy):
    """A `programs=` factory for `generate`: `loop.programs` made under `policy`."""
    from deepseek_vl_jax.generation import loop

    @functools.lru_cache(maxsize=None)
    def progs(config, sampler, mesh, extras=loop.Extras()):
        saved = loop.CPU_DOT_POLICY
        loop.CPU_DOT_POLICY = policy
        try:
            return loop.programs.__wrapped__(config, sampler, mesh, extras)
        finally:
            loop.CPU_DOT_POLICY = saved
    return progs


def split_programs(prompt_policy, decode_policy):
    """A `programs=` factory whose generate runs the prompt program (prompt_policy) and then the decode loop as a
    second program (decode_policy; the state donated)."""
    import jax

    from deepseek_vl_jax.generation import loop
    from deepseek_vl_jax.model import DeepseekVL
    from deepseek_vl_jax.quantization import quantized_layers

    @functools.lru_cache(maxsize=None)
    def progs(config, sampler, mesh, extras=loop.Extras()):
        module, pre = DeepseekVL(config), policy_programs(prompt_policy)(config, sampler, mesh, extras).prefill

        def decode(params, state, sp, stop):
            with quantized_layers():
                return loop.decode_loop(module, sampler, params, state, sp, stop, extras)

        dec = loop.ByRows(decode, loop._state_rows, decode_policy, donate_argnums=1)

        def gen(params, inputs, rng, sp, stop, gen_len):
            return loop.finish_run(dec(params, pre(params, inputs, rng, sp, stop, gen_len), sp, stop), extras)
        return loop.Programs(generate=gen, prefill=pre, step=None)
    return progs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_dot_options.json"))
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in B.P.AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]),
                  dict(os.environ, **B.P.AVX2_ENV))
    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import generate, loop

    start = time.perf_counter()
    B.build_checkpoint(args.checkpoint)
    model = D.load_pretrained(args.checkpoint, progress=False)
    off, on = loop.CpuDotPolicy(loop.YNN_DOTS_OFF, loop.YNN_DOTS_OFF), loop.CpuDotPolicy((), ())
    variants = {"off": policy_programs(off), "on": policy_programs(on),
                "policy": policy_programs(loop.CPU_DOT_POLICY), "split": split_programs(on, off)}
    img, b8 = B.image_batch(40), B.text_batch(8, 64, seed=1)
    run = lambda batch, n, p: generate(model, batch, max_new_tokens=n, eos_token_id=-1, programs=p)
    tokens = {k: (run(img, 24, p), run(b8, 24, p)) for k, p in variants.items()}  # also compiles every program
    first = next(iter(tokens.values()))
    result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "machine": B.P.machine(),
              "isa": args.isa, "policy": {"few_rows": dict(loop.CPU_DOT_POLICY.few_rows),
                                          "many_rows": dict(loop.CPU_DOT_POLICY.many_rows),
                                          "many_rows_from": loop.CPU_DOT_POLICY.many_rows_from},
              "same_greedy_tokens": all(bool((t[0] == first[0]).all() and (t[1] == first[1]).all())
                                        for t in tokens.values()),
              "method": "each round times each variant once per figure, variant order alternating round to round; "
                        "medians over rounds; decode rate = rows * 16 / (t(24 tokens) - t(8 tokens))",
              "rounds": []}
    names = list(variants)
    for r in range(args.rounds):
        row = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            p = variants[name]
            t1, t8, t24 = timed(lambda: run(img, 1, p)), timed(lambda: run(img, 8, p)), timed(lambda: run(img, 24, p))
            p8, b8_8, b8_24 = timed(lambda: run(b8, 1, p)), timed(lambda: run(b8, 8, p)), timed(lambda: run(b8, 24, p))
            row[name] = {"time_to_first_token_s": round(t1, 3), "batch1_tokens_per_s": round(16 / (t24 - t8), 2),
                         "batch8_prompt_s": round(p8, 3), "batch8_tokens_per_s": round(8 * 16 / (b8_24 - b8_8), 2),
                         "load_average": [round(x, 2) for x in os.getloadavg()]}
            print(r, name, row[name], flush=True)
        result["rounds"].append(row)
    med = {name: {f: round(statistics.median(row[name][f] for row in result["rounds"]), 3) for f in FIGURES}
           for name in names}
    result["median"] = med
    result["off_over_on"] = {f: round((med["on"][f] / med["off"][f]) if f.endswith("_s") else
                                      (med["off"][f] / med["on"][f]), 3) for f in FIGURES}  # > 1: off is faster
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"median": med, "off_over_on": result["off_over_on"]}, indent=1))
    stored = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            stored = json.load(f)
        if "machines" not in stored:  # the file's first layout: one run, machine inside
            stored = {"machines": {"earlier runs (one entry, before per-machine keys)": stored}}
    stored.setdefault("machines", {})[B.P.machine_key(result["machine"])] = result
    with open(args.out, "w") as f:
        json.dump(stored, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

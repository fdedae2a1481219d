"""XLA:CPU dot paths for the generation programs, A/B side by side in one process: YNNPACK dots off vs on, per
batch size and program.

    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py [--rounds 6] [--isa avx2] [--variants ...]
    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py --dots-only [--isa avx2]
    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py --split-cost [--isa avx2]
    flock /work/wt/bench.lock python benchmarks/bench_cpu_dot_options.py --end-to-end --variants off,on,policy,split

Same 0.45B checkpoint as bench_generate.py (built there once, cached in --checkpoint). Each variant compiles its own
programs. The same program moves by up to 1.5x run to run on a shared machine, so single runs decide nothing:
samples are short, the variants alternate sample by sample (order reversed every round), figures are medians.
- default (`program_times`): ms of the prompt program (1 image + 40 text tokens, 617 in all; 8 x 64 text tokens)
  and of 4 decode steps at batch 1 and 8, per variant: `off` (YNNPACK dots off), `on` (XLA's defaults), `policy`
  (`loop.CPU_DOT_POLICY`). (The "+t512" / "+t2048" entries in the results: the decoder's few-row products in column
  tiles, a variant of commit addb7b8, measured and not kept.)
- `--end-to-end`: whole `generate` calls per round (time to first token, batch-1 / batch-8 decode tokens/s), plus
  `policy` (`loop.CPU_DOT_POLICY`) and `split` (`CpuDotPolicy(prompt=())`: the prompt program with YNNPACK on,
  then the decode loop as a second program with it off; `loop.SplitGenerate`).
- `--split-cost` (`split_cost`): what running generate as two programs adds, the second program's call alone.
- `--dots-only` (`dot_forms`): GB/s of decode-shaped products alone ([in, out] plain or in column tiles, [out, in]),
  each with YNNPACK dots on and off.
`--isa avx2` reruns itself with XLA limited to AVX2. Writes benchmarks/results/cpu_dot_options.json, per machine key
(`generate_profile.machine_key`) and part.
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


def column_tiles(n: int):
    """x [B, I] @ w [I, O] as a loop over column tiles of n: each tile w[:, c*n:(c+1)*n] is small enough for the
    caches, so an 8-row product streams the weight once instead of missing the cache on every row."""
    import jax
    import jax.numpy as jnp

    def f(x, w):
        def body(c, out):
            tile = jax.lax.dynamic_slice_in_dim(w, c * n, n, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, x @ tile, c * n, axis=1)
        return jax.lax.fori_loop(0, w.shape[1] // n, body, jnp.zeros((x.shape[0], w.shape[1]), x.dtype))
    return f


def dot_forms(rounds: int) -> dict:
    """GB/s of weight read, medians over alternating rounds: decode-shaped products x [B, 1024] by the dense
    layers' [1024, 2816] and the LM head's [1024, 102400] weight ([in, out], as stored), with YNNPACK dots on and
    off, plain or in column tiles (`column_tiles`), and a weight stored [out, in] for reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_vl_jax.generation import loop

    rng, out = np.random.default_rng(0), {}
    for n_out in (2816, 102400):
        w = jnp.asarray(rng.standard_normal((1024, n_out), dtype=np.float32))
        wt = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
        for b in (1, 8):
            x = jnp.asarray(rng.standard_normal((b, 1024), dtype=np.float32))
            ref = np.asarray(x) @ np.asarray(w)
            forms = {}
            for on, opts in (("on", {}), ("off", dict(loop.YNN_DOTS_OFF))):
                forms[f"plain_{on}"] = (jax.jit(lambda x, w: x @ w, compiler_options=opts), w)
                forms[f"out_in_{on}"] = (jax.jit(lambda x, w: jnp.einsum("oi,bi->bo", w, x), compiler_options=opts),
                                         wt)
                for n in (256, 512, 1024, 2048):
                    if n_out % n == 0:
                        forms[f"tiles{n}_{on}"] = (jax.jit(column_tiles(n), compiler_options=opts), w)
            reps = 20 if n_out == 2816 else 2
            times = {k: [] for k in forms}
            for k, (f, ww) in forms.items():
                np.testing.assert_allclose(np.asarray(f(x, ww)), ref, rtol=1e-4, atol=1e-3)
            for r in range(rounds):
                for k in (list(forms) if r % 2 == 0 else list(forms)[::-1]):
                    f, ww = forms[k]
                    times[k].append(timed(lambda: [f(x, ww).block_until_ready() for _ in range(reps)]) / reps)
            for k, ts in times.items():
                out[f"1024x{n_out}_batch{b}_{k}_GBps"] = round(w.nbytes / statistics.median(ts) / 1e9, 1)
            print({k: v for k, v in out.items() if k.startswith(f"1024x{n_out}_batch{b}_")}, flush=True)
        del w, wt
    return out


def program_times(model, variants: dict, rounds: int, steps: int = 4) -> dict:
    """ms per call, medians over `rounds`, of the prompt program (`prefill`: 1 image + 40 text tokens; 8 x 64 text
    tokens) and of `steps` decode steps (`step`, batch 1 on the image prompt, batch 8), per variant. Every sample
    is short and the variants alternate sample by sample (order reversed every round), so that all see the same
    load. Also whether the variants' greedy tokens after the prompt and the steps agree."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    sampler, sp = sampling.Sampler(), sampling.SamplingParams.create()
    stop = loop.StopParams(eos=jnp.full((4,), -1, jnp.int32), pad=jnp.int32(B.TEXT["pad_token_id"]),
                           max_new_tokens=jnp.int32(64))
    params = weights.generation_params(model)
    cases = {"batch1": B.image_batch(40), "batch8": B.text_batch(8, 64, seed=1)}
    progs = {name: factory(model.config, sampler, None) for name, factory in variants.items()}
    args, states, tokens = {}, {}, {}
    for case, batch in cases.items():
        inputs = place(prepare_inputs(model, batch, 64)[0], None)
        args[case] = (params, inputs, jax.random.key(0), sp, stop, kv_cache.gen_buffer_length(64))
        for name, p in progs.items():
            states[name, case] = jax.block_until_ready(p.prefill(*args[case]))
            s = jax.tree.map(jnp.copy, states[name, case])
            for _ in range(steps):
                s = p.step(params, s, sp, stop)
            tokens[name, case] = np.asarray(s.tokens)[:, :steps + 1]
    first = {case: tokens[next(iter(progs)), case] for case in cases}
    samples = {(name, case, what): [] for name in progs for case in cases for what in ("prompt", "steps")}
    names = list(progs)
    for r in range(rounds):
        for case in cases:
            for what in ("prompt", "steps"):
                for name in (names if r % 2 == 0 else names[::-1]):
                    p = progs[name]
                    if what == "prompt":
                        t = timed(lambda: jax.block_until_ready(p.prefill(*args[case])))
                    else:
                        s = jax.block_until_ready(jax.tree.map(jnp.copy, states[name, case]))

                        def run(s=s):
                            for _ in range(steps):
                                s = p.step(params, s, sp, stop)
                            jax.block_until_ready(s)
                        t = timed(run)
                    samples[name, case, what].append(t * 1e3)
        print(r, {f"{n}/{c}/{w}": round(v[-1], 1) for (n, c, w), v in samples.items()}, flush=True)
    out = {"same_greedy_tokens": all(bool((tokens[n, c] == first[c]).all()) for n in progs for c in cases),
           "steps_per_sample": steps, "ms_median": {}, "ms_all": {}}
    for (name, case, what), v in samples.items():
        out["ms_median"][f"{name}/{case}/{what}"] = round(statistics.median(v), 1)
        out["ms_all"][f"{name}/{case}/{what}"] = [round(x, 1) for x in v]
    return out


def split_cost(model, reps: int) -> dict:
    """What running generate as two programs adds (`loop.SplitGenerate`): ms of the decode program called on a
    prefilled state with max_new_tokens=1, so that its loop takes no step; what is left is the second dispatch and
    the state handed over (params, cache, buffers: donated, so in place). Median and quartiles of `reps` calls at
    batch 1 (image prompt) and batch 8, under `CpuDotPolicy(prompt=())`; the whole prompt program's median beside it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    progs = policy_programs(loop.CpuDotPolicy(prompt=()))(model.config, sampling.Sampler(), None)
    sp = sampling.SamplingParams.create()
    stop = loop.StopParams(eos=jnp.full((4,), -1, jnp.int32), pad=jnp.int32(B.TEXT["pad_token_id"]),
                           max_new_tokens=jnp.int32(1))
    params, out = weights.generation_params(model), {}
    for case, batch in (("batch1", B.image_batch(40)), ("batch8", B.text_batch(8, 64, seed=1))):
        inputs = place(prepare_inputs(model, batch, 64)[0], None)
        a = (params, inputs, jax.random.key(0), sp, stop, kv_cache.gen_buffer_length(64))
        assert progs.generate.splits(*a)
        state = jax.block_until_ready(progs.prefill(*a))
        jax.block_until_ready(progs.decode(params, jax.tree.map(jnp.copy, state), sp, stop))  # compile
        prompt = [timed(lambda: jax.block_until_ready(progs.prefill(*a))) * 1e3 for _ in range(3)]
        ts = []
        for _ in range(reps):
            s = jax.block_until_ready(jax.tree.map(jnp.copy, state))
            ts.append(timed(lambda: jax.block_until_ready(progs.decode(params, s, sp, stop))) * 1e3)
        q = np.percentile(ts, [25, 50, 75])
        out[case] = {"decode_program_no_steps_ms": {"p25": round(q[0], 3), "median": round(q[1], 3),
                                                    "p75": round(q[2], 3)},
                     "prompt_program_ms_median_of_3": round(statistics.median(prompt), 1), "calls": reps}
        print(case, out[case], flush=True)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--variants", default="off,on", help="comma-separated: off, on, policy (YNNPACK dots off, "
                        "on, loop.CPU_DOT_POLICY); split (CpuDotPolicy(prompt=()): prompt on, decode off)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time whole generate calls (TTFT, decode rates) instead of the programs alone")
    parser.add_argument("--dots-only", action="store_true", help="only the decode dot forms (`dot_forms`)")
    parser.add_argument("--split-cost", action="store_true",
                        help="only what a split generate adds: the decode program with no step (`split_cost`)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_dot_options.json"))
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in B.P.AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]),
                  dict(os.environ, **B.P.AVX2_ENV))
    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import generate, loop

    start = time.perf_counter()
    if args.dots_only:
        result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "machine": B.P.machine(),
                  "isa": args.isa, "dot_forms_GBps": dot_forms(args.rounds)}
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return store(args.out, result, "dot forms")
    B.build_checkpoint(args.checkpoint)
    model = D.load_pretrained(args.checkpoint, progress=False)
    if args.split_cost:
        result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "machine": B.P.machine(),
                  "isa": args.isa, "split_cost": split_cost(model, 20 * args.rounds)}
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return store(args.out, result, "split cost")
    off, on = loop.CpuDotPolicy(loop.YNN_DOTS_OFF, loop.YNN_DOTS_OFF), loop.CpuDotPolicy((), ())
    policies = {"off": off, "on": on, "policy": loop.CPU_DOT_POLICY,
                "split": loop.CpuDotPolicy(loop.YNN_DOTS_OFF, loop.YNN_DOTS_OFF, prompt=())}
    variants = {}
    for name in args.variants.split(","):  # off | on | policy | split
        variants[name] = policy_programs(policies[name])
    if not args.end_to_end:
        result = {"load_average_at_start": [round(x, 2) for x in os.getloadavg()], "machine": B.P.machine(),
                  "isa": args.isa, "programs": program_times(model, variants, args.rounds)}
        med = result["programs"]["ms_median"]
        if "on" in variants and "off" in variants:  # > 1: YNNPACK off is faster
            result["on_over_off"] = {k.split("/", 1)[1]: round(med[k.replace("off/", "on/", 1)] / v, 3)
                                     for k, v in med.items() if k.startswith("off/")}
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: result[k] for k in ("on_over_off",) if k in result}), json.dumps(med))
        return store(args.out, result, "programs " + ",".join(variants))
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
    if "on" in med and "off" in med:
        result["off_over_on"] = {f: round((med["on"][f] / med["off"][f]) if f.endswith("_s") else
                                          (med["off"][f] / med["on"][f]), 3) for f in FIGURES}  # > 1: off faster
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"median": med, "off_over_on": result.get("off_over_on")}, indent=1))
    return store(args.out, result, "generate calls " + args.variants)


def store(path: str, result: dict, part: str) -> int:
    """Write `result` into the results file under its machine key and `part`, keeping the rest."""
    stored = {}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if "machines" not in stored:  # the file's first layout: one run, machine inside
            stored = {"machines": {"earlier runs (one entry, before per-machine keys)": stored}}
    stored.setdefault("machines", {}).setdefault(B.P.machine_key(result["machine"]), {})[part] = result
    with open(path, "w") as f:
        json.dump(stored, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

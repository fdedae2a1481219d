"""Where a CPU decode step's time goes, at batch 1 and 8 (0.45B shape of bench_generate.py, float32, this host).

    flock /work/wt/bench.lock python benchmarks/decode_breakdown.py [--isa avx2] [--parts programs,hlo,dots,chain]

Parts (each written to benchmarks/results/decode_breakdown.json under this machine's key, `generate_profile.machine_key`):
- `programs`: ms per decode step of the compiled step program alone (state donated, timed in a loop), of the decode
  loop program (`lax.while_loop`; difference of two lengths, prefill excluded) and of whole `generate` calls
  (difference of two lengths): batch 1 on the 1-image prompt (704 cache slots), batch 8 on 8 x 64 text tokens
  (128 slots). What the loop and the host add to the step shows as the differences between the three.
- `hlo`: the compiled decode-step program: its dots by form (operand shapes, contracting dims) and backend (XLA's
  own or a YNNPACK fusion), every copy / dynamic-update-slice / transpose whose result is as large as a layer's KV
  cache or a weight, and the number of thunks (ops the runtime dispatches one by one).
- `dots`: GB/s of weight read of decode-shaped products alone, x [B, I] by [1024, 2816], [2816, 1024], [1024, 1024]
  and the LM head's [1024, 102400]: the weight stored [in, out] (as flax stores it) or [out, in] (torch's), every
  dot_general form of each, YNNPACK dots on and off; torch's Linear beside them. Alone, a 11.5 MB weight stays in
  the last-level cache between calls (faster than a decode step streaming 1 GB from memory can be).
- `chain`: the decoder's dense products in place: 12 layers of q/k/v/o, gate/up/down with RMSNorm, residuals and
  SiLU between them, then the LM head (~1 GB of distinct weights, as a decode step reads them), per weight layout
  and dot form, YNNPACK on / off; variants alternate sample by sample (order reversed every round), medians.
  The step program's time minus the chain's `io ynn_off` (what the step runs) is what is not its dense products.
`--isa avx2` reruns itself with XLA (and torch) limited to AVX2.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_generate as B  # noqa: E402
import generate_profile as P  # noqa: E402

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
PARTS = ("programs", "hlo", "dots", "chain")


def _setup(checkpoint: str):
    import jax
    import jax.numpy as jnp

    import deepseek_vl_jax as D
    from deepseek_vl_jax.generation import loop, sampling, weights

    model = D.load_pretrained(checkpoint, progress=False)
    sampler, sp = sampling.Sampler(), sampling.SamplingParams.create()
    progs = loop.programs(model.config, sampler, None)
    stop = lambda n: loop.StopParams(eos=jnp.full((4,), -1, jnp.int32), pad=jnp.int32(B.TEXT["pad_token_id"]),
                                     max_new_tokens=jnp.int32(n))
    return jax, model, progs, weights.generation_params(model), sp, stop


BATCHES = (("batch1_image_prompt", lambda: B.image_batch(40)), ("batch8_text_prompts", lambda: B.text_batch(8, 64, 1)))


def programs(model, progs, params, sp, stop, jax) -> dict:
    from deepseek_vl_jax.generation import kv_cache
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    runner = B.Runner(model, None)
    short, long = 8, 40
    out = {}
    for name, make in BATCHES:
        batch = make()
        inputs = place(prepare_inputs(model, batch, long + 8)[0], None)
        gen_len = kv_cache.gen_buffer_length(long + 8)
        args = lambda n: (params, inputs, jax.random.key(0), sp, stop(n), gen_len)
        state = progs.prefill(*args(64))
        state = progs.step(params, state, sp, stop(64))
        jax.block_until_ready(state)
        steps = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(8):
                state = progs.step(params, state, sp, stop(64))
            jax.block_until_ready(state)
            steps.append((time.perf_counter() - t0) / 8)
        loops = collections.defaultdict(list)
        for n in (short, long) * 2:
            s = progs.prefill(*args(n))
            jax.block_until_ready(s)
            t0 = time.perf_counter()
            jax.block_until_ready(progs.decode(params, s, sp, stop(n)))
            loops[n].append(time.perf_counter() - t0)
        runner.run_ours(batch, short)
        gens = {n: [P.best_time(lambda: runner.run_ours(batch, n), 2)] for n in (short, long)}
        per = lambda t: round((min(t[long]) - min(t[short])) * 1000 / (long - short), 1)
        out[name] = {"rows": state.tokens.shape[0], "cache_slots": state.key_valid.shape[1],
                     "step_program_alone_ms": round(min(steps) * 1000, 1),
                     "decode_loop_ms_per_step": per(loops), "generate_ms_per_step": per(gens)}
        out[name]["tokens_per_s_generate"] = round(out[name]["rows"] * 1000 / out[name]["generate_ms_per_step"], 1)
        print(f"  programs {name}: {out[name]}", flush=True)
    return out


def _shape_bytes(shape: str) -> int:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", shape).groups()
    size = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2}.get(dtype, 4)
    for d in filter(None, dims.split(",")):
        size *= int(d)
    return size


def hlo_census(text: str, cache_bytes: int, weight_bytes: int) -> dict:
    """Dots by form and backend, large copies / updates / transposes, thunk count of a compiled program's text."""
    entry = text[text.index("\nENTRY"):]
    ynn_bodies = {m.group(1) for m in re.finditer(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion"', text)}
    body, in_entry = None, False
    dots, big, updates = collections.Counter(), collections.Counter(), collections.Counter()
    shapes = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+\[[\d,]*\])", text)}
    shapes.update({m.group(1): m.group(2) for m in re.finditer(r"%?([\w.\-]+): (\w+\[[\d,]*\])", text)})
    for line in text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$", line)
        if head and " = " not in line.split("{")[0]:
            body, in_entry = head.group(1), line.lstrip().startswith("ENTRY")
            continue
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+\[[\d,]*\])\S* (\w[\w\-]*)\((.*)", line)
        if not m:
            continue
        shape, op, rest = m.groups()
        if op == "dot":
            operands = [shapes.get(o, "?") for o in re.findall(r"%([\w.\-]+)", rest.split(")")[0])]
            dims = ",".join(re.findall(r"(\w+_contracting_dims=\{[\d,]*\})", rest))
            backend = "ynn" if body in ynn_bodies else "xla"
            dots[f"{' x '.join(operands)} -> {shape} {dims} [{backend}]"] += 1
        size = _shape_bytes(shape)
        name = re.sub(r"[.0-9]+$", "", line.split("=")[0].replace("ROOT", "").strip())
        if size < min(cache_bytes, weight_bytes) or not in_entry:
            continue  # (fusion bodies: their fusion in the entry stands for them)
        if op == "dynamic-update-slice" or (op == "fusion" and "dynamic-update-slice" in name):
            updates[f"{op} {shape} ({name})"] += 1
        elif op in ("copy", "transpose") or (op == "fusion" and ("copy" in name or "transpose" in name)):
            big[f"{op} {shape} ({name})"] += 1
    thunks = sum(1 for line in entry.splitlines()[1:] if re.match(r"\s*(ROOT )?%", line)
                 and not re.search(r" (parameter|get-tuple-element|tuple|bitcast|constant)\(", line))
    return {"dots_by_form_and_backend": dict(dots.most_common()),
            "copies_transposes_of_cache_or_weight_size": dict(big.most_common()) or "none",
            "cache_updates (fusions writing a cache-sized buffer; in place: the state is donated, no copy above)":
                dict(updates.most_common()) or "none",
            "entry_ops_dispatched (thunks, excl. parameters/tuples/bitcasts/constants)": thunks}


def hlo(model, progs, params, sp, stop, jax) -> dict:
    from deepseek_vl_jax.generation import kv_cache
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    out = {}
    t = model.config.text
    for name, make in BATCHES:
        inputs = place(prepare_inputs(model, make(), 48)[0], None)
        state = progs.prefill(params, inputs, jax.random.key(0), sp, stop(64), kv_cache.gen_buffer_length(48))
        k = state.cache[0][0]
        cache_bytes = k.size * k.dtype.itemsize  # one layer's keys
        compiled = progs.step.lower(params, state, sp, stop(64)).compile()
        out[name] = dict(hlo_census(compiled.as_text(), cache_bytes, t.hidden_size * t.hidden_size * 4),
                         compiler_options=progs.step.options(params, state, sp, stop(64)),
                         one_layer_key_cache_bytes=cache_bytes)
        print(f"  hlo {name}: {json.dumps(out[name])[:600]}", flush=True)
    return out


def _best(fn, reps: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def dots() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    # name -> (weight layout, function of (x [B, I], w)); all give x @ W up to a transpose of the result
    forms = {"bi,io->bo": ("io", lambda x, w: jnp.einsum("bi,io->bo", x, w)),
             "io,bi->ob": ("io", lambda x, w: jnp.einsum("io,bi->ob", w, x)),
             "bi,oi->bo": ("oi", lambda x, w: jnp.einsum("bi,oi->bo", x, w)),
             "oi,bi->ob": ("oi", lambda x, w: jnp.einsum("oi,bi->ob", w, x)),
             "oi,bi->ob then transposed": ("oi", lambda x, w: jnp.einsum("oi,bi->ob", w, x).T)}
    rng = np.random.default_rng(0)
    out = {}
    for i, o in ((1024, 2816), (2816, 1024), (1024, 1024), (1024, 102400)):
        w = rng.standard_normal((i, o), dtype=np.float32)
        ws = {"io": jnp.asarray(w), "oi": jnp.asarray(np.ascontiguousarray(w.T))}
        tw = torch.from_numpy(np.ascontiguousarray(w.T))
        reps = 20 if o < 10000 else 3
        for b in (1, 8):
            x = rng.standard_normal((b, i), dtype=np.float32)
            xj, tx = jnp.asarray(x), torch.from_numpy(x)
            row = {}
            for opt_name, opt in (("ynn_off", YNN_OFF), ("xla_default", {})):
                for name, (layout, f) in forms.items():
                    jf = jax.jit(f, compiler_options=opt)
                    t = _best(lambda: jf(xj, ws[layout]).block_until_ready(), reps)
                    path = P.dot_path(jf, xj, ws[layout])
                    row[f"{opt_name} {name}"] = f"{w.nbytes / t / 1e9:.1f} ({path})"
            row["torch linear"] = f"{w.nbytes / _best(lambda: torch.nn.functional.linear(tx, tw), reps) / 1e9:.1f}"
            out[f"[{b},{i}] x [{i},{o}] GB/s"] = row
            print(f"  dots [{b},{i}]x[{i},{o}]: {row}", flush=True)
        del ws
    return out


def chain(rounds: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    t = B.TEXT
    n_layers, d, f, v = t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    shapes = (("q", d, d), ("k", d, d), ("v", d, d), ("o", d, d), ("g", d, f), ("u", d, f), ("d", f, d))
    rng = np.random.default_rng(0)
    w_io = [{n: rng.standard_normal((i, o), dtype=np.float32) * 0.02 for n, i, o in shapes} for _ in range(n_layers)]
    head = rng.standard_normal((d, v), dtype=np.float32) * 0.02
    io = ([{n: jnp.asarray(w) for n, w in layer.items()} for layer in w_io], jnp.asarray(head))
    oi = ([{n: jnp.asarray(np.ascontiguousarray(w.T)) for n, w in layer.items()} for layer in w_io],
          jnp.asarray(np.ascontiguousarray(head.T)))
    del w_io, head

    def net(mm):
        def run(x, ws, h):
            norm = lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
            for layer in ws:
                y = norm(x)
                x = x + mm(mm(y, layer["q"]) + mm(y, layer["k"]) + mm(y, layer["v"]), layer["o"])
                y = norm(x)
                x = x + mm(jax.nn.silu(mm(y, layer["g"])) * mm(y, layer["u"]), layer["d"])
            return mm(x, h)
        return run

    variants = {
        "io bi,io->bo, ynn_off (what the step runs)": (net(lambda x, w: x @ w), io, YNN_OFF),
        "io bi,io->bo, ynn_on": (net(lambda x, w: x @ w), io, {}),
        "oi oi,bi->ob then transposed, ynn_on": (net(lambda x, w: jnp.einsum("oi,bi->ob", w, x).T), oi, {}),
        "oi oi,bi->ob then transposed, ynn_off": (net(lambda x, w: jnp.einsum("oi,bi->ob", w, x).T), oi, YNN_OFF),
        "oi bi,oi->bo, ynn_on": (net(lambda x, w: jnp.einsum("bi,oi->bo", x, w)), oi, {}),
    }
    out = {}
    for b in (1, 8):
        x = jnp.asarray(rng.standard_normal((b, d), dtype=np.float32))
        fns = {k: jax.jit(fn, compiler_options=opt) for k, (fn, _, opt) in variants.items()}
        ref = None
        for k, fn in fns.items():
            got = np.asarray(fn(x, *variants[k][1]))
            ref = got if ref is None else ref
            np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)
        times = collections.defaultdict(list)
        for r in range(rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                t0 = time.perf_counter()
                for _ in range(3):
                    fns[k](x, *variants[k][1]).block_until_ready()
                times[k].append((time.perf_counter() - t0) / 3 * 1000)
        out[f"batch{b}_ms"] = {k: round(statistics.median(v), 1) for k, v in times.items()}
        print(f"  chain batch {b}: {out[f'batch{b}_ms']}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode_breakdown.json"))
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in P.AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]),
                  dict(os.environ, **P.AVX2_ENV))
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    B.build_checkpoint(args.checkpoint)
    import torch

    torch.set_num_threads(os.cpu_count())
    result = {"machine": P.machine(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if "programs" in parts or "hlo" in parts:
        jax, model, progs, params, sp, stop = _setup(args.checkpoint)
        if "programs" in parts:
            result["programs"] = programs(model, progs, params, sp, stop, jax)
        if "hlo" in parts:
            result["hlo_decode_step"] = hlo(model, progs, params, sp, stop, jax)
        del model, params
    if "dots" in parts:
        result["dot_forms_alone"] = dots()
    if "chain" in parts:
        result["dense_chain_in_place"] = chain()
    if "programs" in result and "dense_chain_in_place" in result:
        for b, name in ((1, "batch1_image_prompt"), (8, "batch8_text_prompts")):
            step = result["programs"][name]["step_program_alone_ms"]
            dense = next(iter(result["dense_chain_in_place"][f"batch{b}_ms"].values()))
            result.setdefault("step_minus_dense_chain_ms", {})[name] = round(step - dense, 1)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    stored = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            stored = json.load(f)
    key = P.machine_key(result["machine"])
    entry = stored.setdefault("machines", {}).setdefault(key, {})
    entry.update(result)
    with open(args.out, "w") as f:
        json.dump(dict(stored, benchmark=__doc__.splitlines()[0]), f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} [{key}] (load {result['load_average_at_start']} -> {result['load_average_at_end']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

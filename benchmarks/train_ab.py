"""Side-by-side variants of one train step (bench_train.py's shape, batch and weights) in one process, their runs
interleaved (A B C A B C ...) so that a load change on the shared machine hits every variant alike.

    python benchmarks/train_ab.py --mode lora --rounds 3 [--variants default,ynn_off,onednn_dot] [--out FILE]

A variant is a set of XLA:CPU compiler options (`VARIANTS`) passed to `Lowered.compile` (the same HLO, another dot
/ fusion backend), or `rev:REV`: the step traced with the `--swap` source files as they are at git revision REV
(their functions put in place of the current ones while it is traced), compiled with the default options; e.g.
`--variants default,rev:HEAD~1 --swap deepseek_vl_jax/attention_grad.py` times a change against its parent; or
`remat:POLICY` (`common.RematPolicy`): the step of the model built with that remat policy; or
`const:MODULE.NAME=VALUE`: the step traced with a module constant set to VALUE (e.g.
`const:deepseek_vl_jax.training.step.LOSS_CHUNK_BYTES=16777216`).
Prints and writes per variant: step times, median, the ratio to the first variant, and the compiled step's
temporaries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (the shape, batch and weights)

_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
VARIANTS = {
    "default": {},
    "ynn_off": _NO_YNN,  # XLA's own (Eigen) dots
    "onednn_dot": {**_NO_YNN, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn_dot": {**_NO_YNN, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "no_concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "memory_scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    # YNNPACK fuses dots, elementwise ops and reductions by default; these keep only some (XLA's loops the rest)
    "ynn_dot_only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "ynn_dot_eltwise": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
}


@contextlib.contextmanager
def swapped(rev: str, files: list[str]):
    """The modules of `files` with their functions and constants as at git revision `rev` (restored after)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = [importlib.import_module(f[:-3].replace("/", ".").removesuffix(".__init__")) for f in files]
    saved = [dict(m.__dict__) for m in mods]
    try:
        for f, m in zip(files, mods):
            src = subprocess.run(["git", "-C", repo, "show", f"{rev}:{f}"], capture_output=True, text=True,
                                 check=True).stdout
            exec(compile(src, f"{rev}:{f}", "exec"), m.__dict__)
        yield
    finally:
        for m, d in zip(mods, saved):
            m.__dict__.clear()
            m.__dict__.update(d)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("full", "lora", "qlora"), default="lora")
    p.add_argument("--shape", choices=("0.45b", "small"), default="0.45b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--swap", default="", help="comma-separated source files that rev: variants take from REV")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bench_train.use_shape(args.shape)
    bench_train.SHAPE = args.shape
    bench_train.WEIGHTS = os.path.join("/tmp", f"deepseek-vl-jax-bench-train-{args.shape}")
    if not os.path.isdir(bench_train.WEIGHTS):
        subprocess.run([sys.executable, bench_train.__file__, "--write-weights", "--shape", args.shape,
                        "--weights", bench_train.WEIGHTS], check=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    import jax

    step, state, batch = bench_train.build_jax_step("none", "none" if args.mode == "full" else args.mode)
    lowered = step.lower(state, batch)
    names = args.variants.split(",")
    compiled, compile_s, temp_gb = {}, {}, {}
    for n in names:
        t = time.perf_counter()
        if n.startswith("rev:"):
            with swapped(n[4:], [f for f in args.swap.split(",") if f]):
                inner = step.__wrapped__  # functools.partial(train_step, ...): rebuilt on the swapped module's
                from deepseek_vl_jax.training import step as step_lib

                fn = functools.partial(step_lib.train_step, *inner.args, **inner.keywords)
                compiled[n] = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
        elif n.startswith("const:"):  # the step traced with a module constant changed: const:MODULE.NAME=VALUE
            target, value = n[6:].split("=")
            mod = importlib.import_module(target.rsplit(".", 1)[0])
            name, saved = target.rsplit(".", 1)[1], getattr(mod, target.rsplit(".", 1)[1])
            setattr(mod, name, type(saved)(value))
            try:
                inner = step.__wrapped__
                fn = functools.partial(inner.func, *inner.args, **inner.keywords)
                compiled[n] = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
            finally:
                setattr(mod, name, saved)
        elif n.startswith("remat:"):  # the same step, the model built with another remat policy
            inner = step.__wrapped__
            module = inner.keywords["module"]
            module = module.clone(config=dataclasses.replace(module.config, remat_policy=n[6:]))
            fn = functools.partial(inner.func, *inner.args, **{**inner.keywords, "module": module})
            compiled[n] = jax.jit(fn, donate_argnums=(0,)).lower(state, batch).compile()
        else:
            compiled[n] = lowered.compile(compiler_options=VARIANTS[n] or None)
        compile_s[n] = round(time.perf_counter() - t, 1)
        temp_gb[n] = round(compiled[n].memory_analysis().temp_size_in_bytes / 2**30, 3)
    for n in names:  # a warm-up step each
        state, m = compiled[n](state, batch)
        jax.block_until_ready(m)
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            t = time.perf_counter()
            state, m = compiled[n](state, batch)
            jax.block_until_ready(m)
            times[n].append(round(time.perf_counter() - t, 3))
            losses[n].append(float(m["loss"]))
    print(json.dumps({"step_times_s": times}), flush=True)  # (kept if anything below fails)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"mode": args.mode, "shape": args.shape, "uptime_at_start": uptime,
              "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "variants": {n: VARIANTS.get(n, n if n.startswith(("remat:", "const:")) else f"{n[4:]}: {args.swap}") for n in names}, "compile_s": compile_s,
              "temp_gb": temp_gb,  # the compiled step's temporaries (`memory_analysis`)
              "step_times_s": times,
              "median_s": med, "ratio_to_first": {n: round(med[names[0]] / med[n], 3) for n in names},
              "losses": losses}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Helpers of bench_generate.py: what machine a run is on, and where the prefill's and the decode step's time goes.

`machine()`: CPU model, vector extensions (AVX2 / AVX-512 / AMX from /proc/cpuinfo), cores, library versions,
XLA flags and the ISA-emulation environment, plus the ISA each library really uses; `machine_key()` names the
results entry. `gemm_rates()`: float32 GEMM / GEMV GFLOP/s of XLA and torch in this process (shows whether an
emulated ISA took effect). `xla_breakdown()`: one compiled program run under jax's profiler, each executed op's
time summed by what it belongs to (op_name metadata of the optimized HLO; YNNPACK fusions, which carry none, by
the ops they fuse), and how many of each category's dots run as YNNPACK fusions or XLA's own (`dot_paths`).
`torch_breakdown()`: torch's profiler on
the same work in transformers.
"""

from __future__ import annotations

import collections
import glob
import os
import platform
import re
import tempfile
import time

EMULATION_ENV = ("XLA_FLAGS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# Environment for `--isa avx2` (set before jax and torch are imported): XLA's code generation and its kernels
# limited to AVX2, torch's ATen kernels, oneDNN and MKL as well.
AVX2_ENV = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_flags() -> dict:
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = {"avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
           "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
           "amx": any(f.startswith("amx") for f in flags)}
    return {"cpu_model": model, "extensions": ext}


def machine() -> dict:
    import jax
    import jaxlib
    import torch

    info = cpu_flags()
    info.update(cores=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
                jaxlib=jaxlib.__version__, torch=torch.__version__,
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                emulation_env={k: os.environ[k] for k in EMULATION_ENV if k in os.environ})
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_key(info: dict) -> str:
    """'<cpu model> / <best ISA> / <cores> cores[ / emulated <ISA>]': results are filed under it."""
    ext = info["extensions"]
    isa = "AMX" if ext["amx"] else "AVX-512" if ext["avx512f"] else "AVX2" if ext["avx2"] else "SSE"
    key = f"{info['cpu_model']} / {isa} / {info['cores']} cores"
    if "xla_cpu_max_isa" in info["emulation_env"].get("XLA_FLAGS", ""):
        key += " / emulated " + info["emulation_env"]["XLA_FLAGS"].split("xla_cpu_max_isa=")[1].split()[0]
    return key


def best_time(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best(fn, repeats: int = 5) -> float:
    fn()  # warm-up (compilation)
    return best_time(fn, repeats)


def gemm_rates() -> dict:
    """GFLOP/s of [M, 1024] x [1024, 2816] for M = 640 (a prefill's MLP), 8 and 1 (decode), XLA vs torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    w = rng.standard_normal((1024, 2816), dtype=np.float32)
    wj, tw = jnp.asarray(w), torch.from_numpy(np.ascontiguousarray(w.T))  # torch's Linear layout [out, in]
    dot = jax.jit(lambda x, w: x @ w)
    out = {}
    for m in (640, 8, 1):
        x = rng.standard_normal((m, 1024), dtype=np.float32)
        xj, tx = jnp.asarray(x), torch.from_numpy(x)
        reps = 1 if m == 640 else 20
        t_xla = _best(lambda: [dot(xj, wj).block_until_ready() for _ in range(reps)]) / reps
        t_torch = _best(lambda: [torch.nn.functional.linear(tx, tw) for _ in range(reps)]) / reps
        flops = 2 * m * 1024 * 2816
        out[f"M{m}"] = {"xla_GFLOPs": round(flops / t_xla / 1e9, 1), "torch_GFLOPs": round(flops / t_torch / 1e9, 1)}
    return out


# (category, test on the op_name metadata), first match wins.
CATEGORIES = (
    ("image encoder", lambda n: "encode_images" in n or "vision_model" in n or "aligner" in n),
    ("LM head", lambda n: "lm_head" in n or "logits" in n),
    ("decoder dense (q/k/v/o, gate/up/down)", lambda n: re.search(r"_proj/dot_general", n) is not None),
    ("KV-cache writes", lambda n: "dynamic_update_slice" in n and ("LlamaBlock" in n or "layers" in n)),
    ("attention mask", lambda n: "cache_mask" in n or "causal_mask" in n or n.endswith("/and")),
    ("decoder attention (logits, softmax, probs x values)", lambda n: "self_attn" in n),
    ("decoder norms, RoPE, residuals", lambda n: "LlamaBlock" in n or "rope" in n or "final_norm" in n),
    ("weight layout (slices/copies of stacked weights)", lambda n: "dynamic_slice" in n or "while" in n),
)


def _instructions(hlo_text: str):
    """(computation, instruction name, line) of each instruction of an HLO module's text."""
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$", line)
        if head and " = " not in line.split("{")[0]:
            computation = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            yield computation, m.group(1), line


def _op_names(hlo_text: str) -> dict:
    """instruction name -> its op_name metadata. A fusion without metadata of its own (XLA:CPU's YNNPACK fusions,
    `ynn_fusion.N`) takes that of an instruction inside the computation it calls (its dot's, where it has one),
    else that of its first named operand (an attention dot reads its operands' transposes); a dot without metadata
    takes its fusion's or its first named operand's, or (XLA:CPU's plain matrix-vector `dot`) is named after the
    weight it reads (`.../lm_head/...` or `.../<x>_proj/dot_general`)."""
    names, inner, calls, callers, bare_dots, operands = {}, {}, {}, {}, [], {}
    for computation, name, line in _instructions(hlo_text):
        meta = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called:
            callers[called.group(1)] = name
        if meta:
            names[name] = meta.group(1)
            if computation not in inner or " dot(" in line:
                inner[computation] = meta.group(1)  # a dot's name wins over the computation's other ops
        elif " dot(" in line:
            weight = re.search(r"(lm_head|\w+_proj)_+kernel", line)
            names[name] = ("lm_head/" if weight and weight.group(1) == "lm_head" else
                           f"{weight.group(1) if weight else 'unknown'}/dot_general")
            if not weight:
                bare_dots.append((computation, name))
        elif called:
            calls[name] = called.group(1)
        operands[name] = re.findall(r"%([\w.\-]+)", line.split(" = ", 1)[1].split("calls=")[0])
    for name, computation in calls.items():
        if computation in inner:
            names[name] = inner[computation]
        elif any(o in names for o in operands[name]):
            names[name] = names[next(o for o in operands[name] if o in names)]
    for computation, name in bare_dots:
        named = [callers.get(computation)] + operands[name]
        if any(o in names and not names[o].startswith("unknown/") for o in named):
            names[name] = names[next(o for o in named if o in names and not names[o].startswith("unknown/"))]
    return names


def dot_paths(hlo_text: str) -> dict:
    """Per category (`CATEGORIES`): how many of the compiled program's dots run as YNNPACK fusions and how many as
    XLA's own dots (a `dot` instruction anywhere but inside a YNNPACK fusion's computation). YNNPACK fusions
    without a dot (its reductions: norms, softmax) are not counted."""
    names = _op_names(hlo_text)
    found, ynn_bodies, with_dot = [], {}, set()
    for computation, name, line in _instructions(hlo_text):
        if " dot(" in line:
            with_dot.add(computation)
        if '"kind":"__ynn_fusion"' in line:
            ynn_bodies[name] = re.search(r"calls=%([\w.\-]+)", line).group(1)
        if name not in names:
            continue
        if name in ynn_bodies:
            found.append((name, "ynn", names[name]))
        elif " dot(" in line:
            found.append((computation, "xla", names[name]))
    out = collections.defaultdict(collections.Counter)
    bodies = set(ynn_bodies.values())
    for where, path, op in found:
        if (path == "xla" and where in bodies) or (path == "ynn" and ynn_bodies[where] not in with_dot):
            continue
        out[next((c for c, test in CATEGORIES if test(op)), "other")][path] += 1
    return {c: dict(v) for c, v in out.items()}


def xla_breakdown(jitted, args: tuple, runs: int = 2) -> dict:
    """Run `jitted(*args)` `runs` times under jax's profiler; per category: ms of op time per run (summed over the
    threads that ran ops, so the total exceeds the wall time on 2 cores) and its share; plus the wall time."""
    import jax
    from jax.profiler import ProfileData

    compiled = jitted.lower(*args).compile()
    names = _op_names(compiled.as_text())
    jax.block_until_ready(jitted(*args))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(runs):
                jax.block_until_ready(jitted(*args))
        wall = (time.perf_counter() - t0) / runs
        data = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
        per = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name not in names:
                        continue
                    op = names[ev.name]
                    cat = next((c for c, test in CATEGORIES if test(op)), "other")
                    per[cat] += ev.duration_ns
    total = sum(per.values())
    out = {c: {"ms": round(v / runs / 1e6, 1), "share": round(v / total, 3)} for c, v in per.most_common()}
    return {"wall_ms_under_profiler": round(wall * 1000, 1), "op_ms_total": round(total / runs / 1e6, 1),
            "by_category": out, "dots_by_path": dot_paths(compiled.as_text())}


def torch_breakdown(fn, runs: int = 2, top: int = 8) -> dict:
    """torch's profiler over `fn()`: wall time, and the `top` ops by self CPU time (ms per run, share)."""
    import torch

    fn()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    wall = (time.perf_counter() - t0) / runs
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_ms_under_profiler": round(wall * 1000, 1),
            "top_ops_by_self_time": {e.key: {"ms": round(e.self_cpu_time_total / runs / 1000, 1),
                                             "share": round(e.self_cpu_time_total / total, 3)} for e in ranked}}


def attention_forms() -> dict:
    """ms per call of the attention forms tried, at the decoder prefill's shape (T = 640 causal, 16 heads of 64,
    704 cache slots) and SigLIP's (576 tokens, 12 heads, bidirectional), with torch's SDPA beside them."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from deepseek_vl_jax import layers, multimodal

    rng = np.random.default_rng(0)
    out = {}
    t, n, h, s = 640, 16, 64, 704
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, h), dtype=np.float32)) for _ in range(3))
    valid = jnp.zeros((1, s), bool).at[:, :t].set(True)
    cmask = multimodal.cache_mask(valid, 0, t)
    zk, zv = jnp.zeros((1, n, s, h)), jnp.zeros((1, n, h, s))
    forms = {
        "jax.nn.dot_product_attention, [T, T] mask (the forward before)":
            lambda q, k, v, m, zk, zv: jax.nn.dot_product_attention(q, k, v, mask=m[..., :t], scale=h**-0.5),
        "cache (empty, 704 slots) + new keys, concatenated (the prefill before)":
            lambda q, k, v, m, zk, zv: layers.cached_attention(q, k, v, zk, zv, m, jnp.int32(0), h**-0.5),
        "heads-first einsum, one block":
            lambda q, k, v, m, zk, zv: layers.heads_first_attention(q, k, v, m[..., :t], h**-0.5),
        "heads-first einsum, causal blocks of 128 queries (now)":
            lambda q, k, v, m, zk, zv: layers.causal_attention(q, k, v, m[..., :t], h**-0.5),
    }
    args = (q, k, v, cmask, zk, zv)  # arguments, not constants (XLA would fold the whole computation)
    for name, fn in forms.items():
        f = jax.jit(fn)
        out["prefill_T640: " + name] = round(_best(lambda: f(*args).block_until_ready()) * 1000, 1)
    tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2) for x in (q, k, v))
    out["prefill_T640: torch SDPA is_causal (transformers)"] = round(_best(
        lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)) * 1000, 1)
    t, n = 576, 12
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, h), dtype=np.float32)) for _ in range(3))
    for name, fn in {"jax.nn.dot_product_attention (before)": lambda q, k, v: jax.nn.dot_product_attention(q, k, v),
                     "heads-first einsum (now)":
                         lambda q, k, v: layers.heads_first_attention(q, k, v, None, h**-0.5)}.items():
        f = jax.jit(fn)
        out["siglip_T576: " + name] = round(_best(lambda: f(q, k, v).block_until_ready()) * 1000, 1)
    tq, tk, tv = (torch.from_numpy(np.array(x)).transpose(1, 2) for x in (q, k, v))
    out["siglip_T576: torch SDPA"] = round(_best(
        lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)) * 1000, 1)
    return out


def decode_dot_forms() -> dict:
    """GB/s of weight read for a decode step's dots, x [B, 1024] by a [1024, 2816] weight and the LM head's
    [1024, 102400]: flax's kernel [in, out] (`bi,io->bo`, what runs) vs a kernel stored [out, in] with the output
    transposed (`oi,bi->ob`), and torch's Linear."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    io = jax.jit(lambda x, w: jnp.einsum("bi,io->bo", x, w))
    oi = jax.jit(lambda x, w: jnp.einsum("oi,bi->ob", w, x))
    out = {}
    for n in (2816, 102400):
        w = rng.standard_normal((1024, n), dtype=np.float32)
        wj, wt = jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
        tw = torch.from_numpy(np.ascontiguousarray(w.T))
        for b in (1, 8):
            x = rng.standard_normal((b, 1024), dtype=np.float32)
            xj, tx = jnp.asarray(x), torch.from_numpy(x)
            reps = 10 if n == 2816 else 2
            for name, fn in (("bi,io->bo", lambda: io(xj, wj).block_until_ready()),
                             ("oi,bi->ob", lambda: oi(xj, wt).block_until_ready()),
                             ("torch_linear", lambda: torch.nn.functional.linear(tx, tw))):
                t = _best(lambda: [fn() for _ in range(reps)], 3) / reps
                out[f"1024x{n}_batch{b}_{name}_GBps"] = round(w.nbytes / t / 1e9, 1)
            out[f"1024x{n}_batch{b}_bi,io->bo_compiled_as"] = dot_path(io, xj, wj)
        del wj, wt
    return out


def dot_path(jitted, *args) -> str:
    """Which library XLA:CPU hands a compiled dot to: a YNNPACK, XNNPACK or oneDNN fusion, else its own kernels
    (the fusion kinds jaxlib 0.10.2 writes into the compiled HLO's backend config)."""
    text = jitted.lower(*args).compile().as_text()
    found = [k for k in ("ynn", "xnn", "onednn") if f'"kind":"__{k}_fusion"' in text]
    return found[0] if found else "xla"

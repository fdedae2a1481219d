"""Weight-only quantization: parameter bytes, memory while loading and generating, decode speed and logits error.

    python benchmarks/bench_quantize.py [--checkpoint DIR]

- Parameter bytes per scheme (float32, int8, int4 group 128) for the DeepSeek-VL-1.3B and DeepSeek-VL-7B-hybrid
  shapes, by `jax.eval_shape` (nothing allocated), decoder (q/k/v/o, gate/up/down) and whole model.
- On the benchmark shape of bench_generate.py (~0.45B, random weights; the same cached checkpoint), one fresh
  subprocess per mode (float32, int8, int4): peak host memory while loading (VmHWM over the load, minus the
  process's footprint before it), then the peak while generating (VmHWM reset after the programs compiled and ran
  once) against parameter bytes + KV cache, also as anonymous memory only (RssAnon: without the shared libraries'
  code pages), batch-1 decode tokens/s (difference of two generation lengths, prefill cancels, best of
  --repeats) and the last 32 positions' logits of an image prompt, compared with float32 (max |error| / max
  |logit|, top-1 agreement). Then, after those measurements, the generate program's `memory_analysis()` (its
  temporaries hold the KV cache) and kernel counts, and for int8/int4 the decode rate of the block-loop form
  (`quantization.ops.DECODE_FORM = DecodeForm.BLOCKED`, the default before) and of the decoder split into
  per-layer views (`weights.split_on`, the float32 layout and the quantized one before; a quantized decoder is
  scanned by default) in the same process, side by side with the default.
The peak is accounted for (`peak_account_bytes`, heap trimmed at each point so only resident memory counts):
parameters; what loading leaves besides them; what the first generate calls keep (the compiled executable,
jax's trace caches, new threads' stacks); the transient while generating (sampled RssAnon peak minus idle: the
program's temporaries, KV cache included); library code pages (RssFile growth); `memory_analysis()` of the
generate program and, alone, of its parts (image encoder, prefill, one decode step); and what dropping every
program and jax's caches gives back. `runtime_probe_no_model_code` (a fresh process, pure jnp, no model code)
shows what XLA:CPU keeps per compiled program: its executable grows with the program's size, and a program's
temporaries stay allocated after it ran until the executable is deleted.
`--modes` runs some modes only (each locked run stays under 10 minutes on a loaded machine); the results of the
others are kept from the previous run of that mode. Writes benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torchvision_ops  # noqa: E402  transformers imports torchvision: see tests/torchvision_ops.py

torchvision_ops.ensure_importable()

MODES = ("float32", "int8", "int4")
SHORT, LONG = 8, 40

SHAPES = {
    "deepseek-vl-1.3b": dict(
        text=dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16, vision_use_head=False), hybrid=False),
    "deepseek-vl-7b-hybrid": dict(
        text=dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16, vision_use_head=False),
        sam=dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12,
                 image_size=1024, patch_size=16, window_size=14, global_attn_indexes=[2, 5, 8, 11], mlp_dim=3072),
        hybrid=True),
}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def status_all() -> dict:
    return {f: status_kb(f) for f in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def rss_file_anon() -> tuple[int, int]:
    """(RssAnon, RssFile) in bytes after giving the heap's free pages back (`malloc_trim`): what stays resident."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return status_kb("RssAnon"), status_kb("RssFile")


def malloc_bytes() -> dict:
    """glibc's `mallinfo2`: bytes malloc hands out (in use) and holds free, all arenas, mmapped chunks included."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    m = libc.mallinfo2()
    return {"in_use": m.uordblks + m.hblkhd, "free_in_heap": m.fordblks}


def live_bytes_besides(params) -> int:
    """Bytes of the live jax arrays that are neither a parameter nor a view into one (the per-layer trees)."""
    import jax

    leaves = jax.tree.leaves(params)  # a QTensor's values and scales
    spans = [(x.unsafe_buffer_pointer(), x.nbytes) for x in leaves]
    ids = {id(x) for x in leaves}
    total = 0
    for x in jax.live_arrays():
        if id(x) in ids:
            continue
        p = x.unsafe_buffer_pointer()
        if not any(start <= p < start + n for start, n in spans):
            total += x.nbytes
    return total


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def shape_bytes() -> dict:
    """Parameter bytes per scheme for the real model shapes, by eval_shape."""
    import transformers

    from deepseek_vl_jax import quantization as Q
    from deepseek_vl_jax.config import ModelConfig
    from deepseek_vl_jax.pretrained import abstract_params
    from flax.core import meta
    import jax.numpy as jnp

    out = {}
    for name, s in SHAPES.items():
        kw = dict(text_config=s["text"], vision_config=s["vision"], image_token_id=100015, tie_word_embeddings=False)
        cfg = (transformers.DeepseekVLHybridConfig(high_res_vision_config=s["sam"], **kw) if s["hybrid"]
               else transformers.DeepseekVLConfig(**kw))
        config = ModelConfig.from_hf(cfg.to_dict())
        boxed = abstract_params(config)
        shapes = meta.unbox(boxed)
        row = {"num_parameters": int(sum(x.size for x in __import__("jax").tree.leaves(shapes)))}
        for scheme in (None, "int8", "int4"):
            tree = shapes if scheme is None else Q.abstract_quantized(
                shapes, Q.plan(boxed, Q.QuantizeConfig.create(scheme)), jnp.float32, jnp.float32)
            row[scheme or "float32"] = {"decoder_bytes": Q.nbytes(tree, ("language_model", "layers")),
                                        "total_bytes": Q.nbytes(tree)}
        for scheme in ("int8", "int4"):
            row[scheme]["decoder_ratio"] = row[scheme]["decoder_bytes"] / row["float32"]["decoder_bytes"]
            row[scheme]["total_ratio"] = row[scheme]["total_bytes"] / row["float32"]["total_bytes"]
        out[name] = row
    return out


def child(mode: str, checkpoint: str, out: str, repeats: int) -> None:
    """One mode in this (fresh) process: load, generate, logits."""
    import jax
    import numpy as np

    from bench_generate import image_batch, Runner
    from deepseek_vl_jax import load_pretrained, quantization as Q
    from deepseek_vl_jax.generation import kv_cache
    from deepseek_vl_jax.generation.inputs import prepare_inputs
    from deepseek_vl_jax.quantization import ops

    jax.numpy.zeros(1).block_until_ready()
    before, before_anon, before_file = status_kb("VmRSS"), status_kb("RssAnon"), status_kb("RssFile")
    before_threads = threads()
    reset_peak()
    t0 = time.perf_counter()
    scheme = None if mode.startswith("float32") else mode
    model = load_pretrained(checkpoint, progress=False, quantize=scheme)
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    load_peak = status_kb("VmHWM") - before
    param_bytes = Q.nbytes(model.params)
    largest = max(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if not isinstance(x, Q.QTensor) else
                     jax.ShapeDtypeStruct(x.shape, np.float32), model.params, is_leaf=lambda x: isinstance(x, Q.QTensor))))
    from deepseek_vl_jax.generation import weights

    weights.release_heap_after_compiles()  # what generate installs first; here so the next line is trimmed too
    loaded_anon, _ = rss_file_anon()
    batch = image_batch(16)
    runner = Runner(model, None)
    inputs, _ = prepare_inputs(model, batch, LONG)
    t = model.config.text
    slots = inputs["input_ids"].shape[1] + kv_cache.gen_buffer_length(LONG)
    cache_bytes = 2 * t.num_hidden_layers * t.num_key_value_heads * slots * t.head_dim * 4
    runner.run_ours(batch, SHORT)  # compile both lengths' programs (one bucket) before measuring
    runner.run_ours(batch, LONG)
    idle_anon, idle_file = rss_file_anon()
    idle_malloc, idle_threads = malloc_bytes(), threads()
    live = live_bytes_besides(model.params)
    before_gen = status_all()
    reset_peak()
    anon = Sampler()
    with anon:
        rate = runner.decode_rate(batch, SHORT, LONG, repeats, "ours")
    gen_peak = status_kb("VmHWM")
    peak_file = status_kb("RssFile")
    program = program_memory(model, batch)
    blocked_rate = split_rate = None
    if scheme is not None:  # side by side in this process: the block-loop form, the decoder split into layers
        from deepseek_vl_jax.generation import loop

        def other_rate():
            loop.programs.cache_clear()
            runner.run_ours(batch, SHORT)
            return runner.decode_rate(batch, SHORT, LONG, repeats, "ours")

        form, ops.DECODE_FORM = ops.DECODE_FORM, ops.DecodeForm.BLOCKED
        blocked_rate = other_rate()
        ops.DECODE_FORM = form
        split_on, weights.split_on = weights.split_on, lambda model: True
        split_rate = other_rate()
        weights.split_on = split_on
        loop.programs.cache_clear()
        rate = max(rate, runner.decode_rate(batch, SHORT, LONG, repeats, "ours"))  # the default again, after them
    logits = np.asarray(model(**batch))[0, -32:]
    np.save(out + ".npy", logits)
    kept_anon, _ = rss_file_anon()
    from deepseek_vl_jax.generation import loop

    loop.programs.cache_clear()
    jax.clear_caches()
    import gc

    gc.collect()
    dropped_anon, _ = rss_file_anon()
    account = {
        "params": param_bytes, "kv_cache": cache_bytes,
        "load_leftover_anon": loaded_anon - before_anon - param_bytes,
        "kept_after_first_generates_anon": idle_anon - loaded_anon,
        "freed_by_dropping_every_program_and_trace_cache_anon": kept_anon - dropped_anon,
        "transient_while_generating_anon": anon.peak - idle_anon,
        "generate_temps_besides_kv_cache": program["generate"]["temp"] - cache_bytes,
        "library_code_pages_file": peak_file - before_file,
        "live_jax_arrays_besides_params_and_their_views_at_idle": live,
        "malloc_at_idle": idle_malloc, "threads_before_load": before_threads, "threads_at_idle": idle_threads,
    }
    explained = (param_bytes + account["load_leftover_anon"] + account["kept_after_first_generates_anon"]
                 + account["transient_while_generating_anon"] + account["library_code_pages_file"])
    account["unexplained"] = (gen_peak - before) - explained
    result = {
        "mode": mode, "load_seconds": load_s, "param_bytes": param_bytes, "largest_tensor_float32_bytes": largest,
        "load_peak_bytes_over_start": load_peak,
        "load_peak_ratio_to_params_plus_one_tensor": load_peak / (param_bytes + largest),
        "process_rss_before_load_bytes": before, "process_anon_before_load_bytes": before_anon,
        "status_before_generate_bytes": before_gen,
        "generate_peak_bytes": gen_peak, "generate_peak_over_start_bytes": gen_peak - before,
        "kv_cache_bytes": cache_bytes,
        "generate_peak_ratio_to_params_plus_cache": (gen_peak - before) / (param_bytes + cache_bytes),
        "generate_peak_anon_over_start_bytes": anon.peak - before_anon,
        "generate_peak_anon_ratio_to_params_plus_cache": (anon.peak - before_anon) / (param_bytes + cache_bytes),
        "generate_program_memory_analysis_bytes": program["generate"],
        "programs_memory_analysis_bytes": program,
        "peak_account_bytes": account,
        "decode_tokens_per_s": rate,
        "decode_form": None if scheme is None else ops.DECODE_FORM.value,
        "decode_tokens_per_s_blocked_form": blocked_rate,
        "decoder_layout": "split" if weights.split_on(model) else "scanned",
        "decode_tokens_per_s_split_layout": split_rate,
        "load_average_after": os.getloadavg(),
    }
    with open(out, "w") as f:
        json.dump(result, f)


class Sampler:
    """Peak RssAnon while the block runs, sampled every 5 ms by a thread (the kernel keeps no anonymous HWM)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = status_kb("RssAnon"), threading.Event()

        def run():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, status_kb("RssAnon"))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_kb("RssAnon"))


def program_memory(model, batch) -> dict:
    """memory_analysis() (argument / output / alias / temp bytes) of each program generation compiles for `batch`
    (LONG tokens; compiled again here): the whole generate program (prefill + decode loop, what `generate`
    runs), and for the account its parts alone: the image encoder, the prefill, one decode step."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
    from deepseek_vl_jax.generation.inputs import MAX_EOS, place, prepare_inputs

    c = model.config
    sampler = sampling.Sampler.create(False, 1.0, 0, 1.0, 1.0)
    sp = sampling.SamplingParams.create(1.0, 0, 1.0, 1.0)
    stop = loop.StopParams(eos=jnp.full((MAX_EOS,), -1, jnp.int32), pad=jnp.int32(c.text.pad_token_id),
                           max_new_tokens=jnp.int32(LONG))
    inputs = place(prepare_inputs(model, batch, LONG)[0], None)
    progs, params, gen_len = loop.programs(c, sampler, None), weights.generation_params(model), \
        kv_cache.gen_buffer_length(LONG)
    args = (params, inputs, jax.random.key(0), sp, stop, gen_len)
    state = progs.prefill.eval_shape(*args)
    compiled = {"generate": progs.generate.lower(*args), "prefill": progs.prefill.lower(*args),
                "decode_step": progs.step.lower(params, state, sp, stop),
                "image_encoder": model._image_features.lower(model.params, inputs["pixel_values"], None)}
    out = {}
    for name, lowered in compiled.items():
        compiled_program = lowered.compile()
        ma = compiled_program.memory_analysis()
        out[name] = {k: getattr(ma, k + "_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
        out[name]["kernels"] = kernel_counts(compiled_program.as_text())
    return out


def kernel_counts(hlo: str) -> dict:
    """Of an optimized HLO module's text: its lines, fusions, dots and while loops. XLA:CPU keeps runtime memory
    per compiled kernel (a fusion or an unfused elementwise op), whatever its size; a dot is a library call."""
    return {"hlo_lines": hlo.count("\n"), "fusions": hlo.count(" fusion("), "dots": hlo.count(" dot("),
            "whiles": hlo.count(" while(")}


def runtime_probe(out: str) -> None:
    """No model code (a fresh process): one program of 84 steps, each a `fori_loop` of 16 small dots over int8
    blocks (the shape of the decode form, pure jnp), compiled three times in a row; what each compile leaves
    resident (executable and runtime state, heap trimmed), what deleting the executable gives back, and the same
    for a program of 84 plain dots. The first compile of a process also leaves the runtime's one-time state."""
    import gc

    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax.generation import weights

    weights.release_heap_after_compiles()

    def program(loops: bool):
        def f(x, ws):
            for w in ws:
                if not loops:
                    x = jnp.tanh(x @ w.astype(jnp.float32))
                    continue

                def body(i, acc, w=w, x=x):
                    return acc + jax.lax.dynamic_slice_in_dim(x, i * 64, 64, 1) @ jax.lax.dynamic_slice_in_dim(
                        w, i * 64, 64, 0).astype(jnp.float32)

                x = jnp.tanh(jax.lax.fori_loop(0, 16, body, jnp.zeros_like(x)))
            return x
        return f

    x, ws = jnp.ones((1, 1024)), [jnp.ones((1024, 1024), jnp.int8) for _ in range(84)]
    jax.block_until_ready(ws)
    runs = []
    for loops in (True, True, True, False):
        a0, f0 = rss_file_anon()
        t0 = threads()
        compiled = jax.jit(program(loops)).lower(x, ws).compile()
        jax.clear_caches()  # the trace caches go; the executable stays
        gc.collect()
        a1, f1 = rss_file_anon()
        compiled(x, ws).block_until_ready()
        a2, _ = rss_file_anon()
        hlo_lines = compiled.as_text().count("\n")
        del compiled
        gc.collect()
        a3, _ = rss_file_anon()
        runs.append({"form": "84 fori_loops" if loops else "84 dots", "optimized_hlo_lines": hlo_lines,
                     "kept_after_compile_anon": a1 - a0, "kept_after_one_run_anon": a2 - a0,
                     "freed_by_deleting_the_executable_anon": a2 - a3, "library_code_pages_file": f1 - f0,
                     "new_threads": threads() - t0})
    with open(out, "w") as f:
        json.dump(runs, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b", help="the cached random checkpoint "
                   "(built by bench_generate.build_checkpoint if absent)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("MODE", "OUT"))
    p.add_argument("--probe", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.checkpoint, args.child[1], args.repeats)
        return
    if args.probe:
        runtime_probe(args.probe)
        return
    import numpy as np

    from bench_generate import TEXT, VISION, build_checkpoint

    build_checkpoint(args.checkpoint)
    load_start = os.getloadavg()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    path = os.path.join(ROOT, "benchmarks", "results", "quantize.json")
    previous = {}
    if os.path.isfile(path):
        with open(path) as f:
            previous = {k: v for k, v in json.load(f).get("runs", {}).items() if k in MODES}
    runs = dict(previous)
    for mode in args.modes.split(","):
        out = f"/tmp/bench_quantize_{mode}.json"
        subprocess.run([sys.executable, os.path.abspath(__file__), "--checkpoint", args.checkpoint,
                        "--repeats", str(args.repeats), "--child", mode, out], check=True)
        with open(out) as f:
            runs[mode] = json.load(f)
        runs[mode]["uptime_before"] = uptime_start
        print(json.dumps(runs[mode]), flush=True)
    probe = "/tmp/bench_quantize_probe.json"
    subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", probe], check=True)
    with open(probe) as f:
        probe_runs = json.load(f)
    ref = np.load("/tmp/bench_quantize_float32.json.npy")
    for mode in args.modes.split(","):
        got = np.load(f"/tmp/bench_quantize_{mode}.json.npy")
        runs[mode]["logits_max_rel_err_vs_float32"] = float(np.abs(got - ref).max() / np.abs(ref).max())
        runs[mode]["top1_agreement_vs_float32"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    import jax
    import transformers
    result = {
        "benchmark": "weight-only quantization: bytes, memory, decode speed, logits error",
        "model_shapes_by_eval_shape": shape_bytes(),
        "benchmark_shape": {"text": TEXT, "vision": VISION, "image_tokens": 576, "random_weights": True,
                            "decode": f"batch 1, one image + 16 text tokens, {SHORT} vs {LONG} new tokens"},
        "runs": runs,
        "runtime_probe_no_model_code": probe_runs,
        "environment": {"python": platform.python_version(), "jax": jax.__version__,
                        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                        "uptime_at_start": uptime_start},
        "method": "each mode in a fresh subprocess; peaks are /proc/self/status VmHWM (reset through clear_refs) "
                  "minus VmRSS before loading, and RssAnon sampled every 5 ms minus RssAnon before loading; "
                  "int4 group size 128; scales float32; the runs of modes not in --modes are kept from their "
                  "previous run (each run records its uptime)",
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result["model_shapes_by_eval_shape"], indent=1))


if __name__ == "__main__":
    main()

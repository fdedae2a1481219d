"""Generation speed: deepseek_vl_jax.generate vs transformers' generate, side by side in one process, same weights.

    python benchmarks/bench_generate.py [--checkpoint DIR] [--sweep]

Model: a DeepSeek-VL shape of ~0.45B parameters (LLaMA 12 layers, hidden 1024, 16 heads, intermediate 2816, vocab
102400, untied head; SigLIP 12 layers, hidden 768, 384 px, patch 16 -> 576 image tokens), random weights built with
transformers and saved once (cached in --checkpoint), loaded by both libraries. float32 unless stated.

Measures: memory bandwidth (same run), batch-1 decode tokens/s and its fraction of the bandwidth roofline (weight
bytes read per token / bandwidth; also `--paired-rounds` rounds of bandwidth and decode measured back to back,
their median fraction: `decode_batch1_paired_roofline`), batch-8 decode throughput, time to first token (image encoding + prefill),
compile time of the first call, compilations over a run of varied prompts, bfloat16 weights (correctness, speed).
Decode rates are differences of two generation lengths (prefill cancels), best of `--repeats`.
`--sweep` also times the decode step under XLA CPU option sets, each in a fresh subprocess (flags are read once).
`--isa avx2` reruns itself with XLA, torch, oneDNN and MKL limited to AVX2 (an AVX2 machine approximated on an
AVX-512 one; `machine.torch_cpu_capability` and `gemm_GFLOPs` show what took effect).
Also records the machine (CPU model, vector extensions, cores, versions, flags) and a profile of the prefill and
the decode step by what the time goes to, ours (jax's profiler) and transformers' (torch's profiler).
Writes benchmarks/results/generate.json, one entry per machine key (`generate_profile.machine_key`).
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
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import torchvision_ops  # noqa: E402  transformers imports torchvision: see tests/torchvision_ops.py
import generate_profile as P  # noqa: E402
from decode_rates import measure_bandwidth, paired_roofline  # noqa: E402

torchvision_ops.ensure_importable()

TEXT = dict(vocab_size=102400, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=100000,
            eos_token_id=100001, pad_token_id=100001)
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384,
              patch_size=16, vision_use_head=False)
IMAGE_TOKEN = 100015
UNRECORDED = "machine not recorded (runs up to 2026-11-30; README's first figures)"
NUM_IMAGE_TOKENS = 576


def build_checkpoint(path: str) -> str:
    """Random-init the model with transformers (seeded) and save it, once."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DeepseekVLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE_TOKEN,
                                           tie_word_embeddings=False)
    model = transformers.DeepseekVLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    return path


best_time = P.best_time


def text_batch(batch: int, length: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(200, 100000, size=(batch, length))
    ids[:, 0] = TEXT["bos_token_id"]
    return {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int64)}


def image_batch(text_len: int, seed: int = 0) -> dict:
    """One row: bos, 576 image tokens, `text_len` text tokens; one random 384 px image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = [TEXT["bos_token_id"]] + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS + list(rng.integers(200, 100000, size=text_len))
    return {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
            "pixel_values": rng.standard_normal((1, 3, 384, 384)).astype(np.float32)}


class Runner:
    """Both libraries' greedy generate with eos disabled, timed the same way."""

    def __init__(self, ours, hf):
        self.ours, self.hf = ours, hf

    def run_ours(self, batch, n, model=None, **kw):
        from deepseek_vl_jax.generation import generate

        return generate(model or self.ours, batch, max_new_tokens=n, eos_token_id=-1, **kw)

    def run_hf(self, batch, n, model=None):
        import torch

        kw = {k: torch.from_numpy(v) for k, v in batch.items()}
        with torch.no_grad():
            out = (model or self.hf).generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               eos_token_id=None, pad_token_id=TEXT["pad_token_id"])
        return out[:, batch["input_ids"].shape[1]:].numpy()

    def decode_rate(self, batch, short: int, long: int, repeats: int, which: str, model=None) -> float:
        """Generated tokens per second over the decode steps only: (t(long) - t(short)) / (long - short) steps."""
        run = self.run_ours if which == "ours" else self.run_hf
        times = {}
        for n in (short, long):
            times[n] = best_time(lambda: run(batch, n, model), repeats)
        per_step = (times[long] - times[short]) / (long - short)
        return batch["input_ids"].shape[0] / per_step


def layer_layout_experiment(model, steps: int = 10) -> dict:
    """Decode-step time with the decoder's layers scanned over stacked weights (what a training-style model does)
    vs split into per-layer buffers, with q/k/v and gate/up fused or not (`generate` uses fused per-layer buffers
    on one device); batch 1, 128-slot cache."""
    import functools

    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax import multimodal
    from deepseek_vl_jax.generation import kv_cache, weights

    c, module = model.config, model.module
    s = 128
    ids = jnp.ones((1, 1), jnp.int32)
    positions = jnp.full((1, 1), 64, jnp.int32)
    mask = multimodal.cache_mask(jnp.ones((1, s), bool), 64, 1)
    per_layer = lambda: kv_cache.init_cache(c.text, 1, s, jnp.float32)  # fresh for each run: they are donated
    stacked = lambda: tuple(jnp.stack([layer[i] for layer in per_layer()]) for i in range(2))

    @functools.partial(jax.jit, donate_argnums=1)
    def scanned(params, cache):
        apply = functools.partial(module.apply, {"params": params})
        hidden, cache = apply(apply(ids, method="embed"), positions, mask, cache, 64, method="decode")
        return apply(hidden, method="logits"), cache

    @functools.partial(jax.jit, donate_argnums=1)
    def split(params, cache):
        apply = functools.partial(module.apply, {"params": params["params"]})
        hidden, cache = apply(apply(ids, method="embed"), positions, mask, params["layers"], cache, 64,
                              method="decode_layers")
        return apply(hidden, method="logits"), cache

    out = {}
    runs = (("scan_over_stacked_layers", scanned, model.params, stacked),
            ("per_layer_buffers", split, weights.split_layers(model.params, fuse=False), per_layer),
            ("per_layer_buffers_fused_qkv_gate_up", split, weights.split_layers(model.params, fuse=True), per_layer))
    for name, fn, params, make_cache in runs:
        logits, cache = fn(params, make_cache())
        logits.block_until_ready()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = fn(params, cache)
        logits.block_until_ready()
        out[name + "_step_ms"] = round((time.perf_counter() - t0) / steps * 1000, 1)
    return out


def matmul_layout_experiment() -> dict:
    """[B, 1024] x (1024 x 11264) weight: XLA `bi,io->bo` (kernel [in, out], what flax Dense stores) vs `bi,oi->bo`
    (torch's [out, in]) and torch's Linear, as GB/s of weight read."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    k, n = 1024, 11264
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    wj, wtj = jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
    tw = torch.from_numpy(np.ascontiguousarray(w.T))
    io = jax.jit(lambda x, w: jnp.einsum("bi,io->bo", x, w))
    oi = jax.jit(lambda x, w: jnp.einsum("bi,oi->bo", x, w))
    out = {}
    for b in (1, 8):
        x = np.random.default_rng(1).standard_normal((b, k), dtype=np.float32)
        xj, tx = jnp.asarray(x), torch.from_numpy(x)
        for name, fn in (("xla_bi_io", lambda: io(xj, wj).block_until_ready()),
                         ("xla_bi_oi", lambda: oi(xj, wtj).block_until_ready()),
                         ("torch_linear", lambda: torch.nn.functional.linear(tx, tw))):
            fn()
            t = best_time(lambda: [fn() for _ in range(10)], 3) / 10
            out[f"{name}_batch{b}_GBps"] = round(w.nbytes / t / 1e9, 2)
    return out


def pick_torch_threads(hf) -> dict:
    """Time one cached decode step of transformers with 1 and with all torch threads and keep the faster: on a
    machine shared with other jobs, torch's OpenMP barriers across 2 threads can be several times slower."""
    import torch

    ids = torch.randint(200, 100000, (1, 64))
    times = {}
    with torch.no_grad():
        for n in sorted({1, os.cpu_count()}):
            torch.set_num_threads(n)
            cache = hf(input_ids=ids, use_cache=True).past_key_values
            step = lambda: hf(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
            step()
            times[n] = best_time(step, 3)
    best = min(times, key=times.get)
    torch.set_num_threads(best)
    return {"step_ms_by_threads": {k: round(v * 1000, 1) for k, v in times.items()}, "chosen": best}


def weight_bytes(model) -> dict:
    """Bytes a decode step must read: the decoder layers, final norm and LM head (one embedding row is negligible)."""
    import jax

    lm = model.params["language_model"]
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    head = lm["lm_head"] if "lm_head" in lm else lm["embed_tokens"]
    total = size(model.params)
    return {"decode_weight_bytes": size(lm["layers"]) + size(lm["norm"]) + size(head), "total_param_bytes": total,
            "total_params": sum(x.size for x in jax.tree.leaves(model.params))}


def kv_bytes(config, context: int, batch: int = 1) -> int:
    t = config.text
    return 2 * t.num_hidden_layers * batch * context * t.num_key_value_heads * t.head_dim * 4


def breakdown(model, hf, img: dict, batch8: dict) -> dict:
    """Where the time goes: our prefill program (1 image, the TTFT prompt) and decode step (batch 1 on that prompt,
    batch 8 on the text prompts) under jax's profiler, by category and dot path, with the compiler options each
    ran with; transformers' prefill under torch's profiler."""
    import jax
    import torch

    from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
    from deepseek_vl_jax.generation.inputs import place, prepare_inputs

    sampler, sp = sampling.Sampler(), sampling.SamplingParams.create()
    stop = loop.StopParams(eos=jax.numpy.full((4,), -1, jax.numpy.int32), pad=jax.numpy.int32(TEXT["pad_token_id"]),
                           max_new_tokens=jax.numpy.int32(64))
    progs = loop.programs(model.config, sampler, None)
    params = weights.generation_params(model)
    out = {}
    for name, batch in (("batch1_image_prompt", img), ("batch8_text_prompts", batch8)):
        inputs = place(prepare_inputs(model, batch, 8)[0], None)
        gen_len = kv_cache.gen_buffer_length(8)
        args = (params, inputs, jax.random.key(0), sp, stop, gen_len)
        if name.startswith("batch1"):
            out["ours_prefill_" + name] = dict(P.xla_breakdown(progs.prefill, args),
                                               compiler_options=progs.prefill.options(*args))
        state = progs.prefill(*args)
        # not donated: the same state is rerun; the one jit takes the programs' compiler options (a nested jit cannot)
        options = progs.step.options(params, state, sp, stop)
        step = jax.jit(lambda p, s: progs.step.__wrapped__(p, s, sp, stop), compiler_options=options)
        out["ours_decode_step_" + name] = dict(P.xla_breakdown(step, (params, state), runs=5), compiler_options=options)
    kw = {k: torch.from_numpy(v) for k, v in img.items()}
    with torch.no_grad():
        out["transformers_prefill_batch1_image_prompt"] = P.torch_breakdown(lambda: hf(**kw, use_cache=True))
        out["transformers_image_encoder_s"] = round(P._best(
            lambda: hf.model.get_image_features(pixel_values=kw["pixel_values"]), 2), 3)
    enc = jax.jit(lambda p, x: model.module.apply({"params": p}, x, method="encode_images"))
    pix = jax.numpy.asarray(img["pixel_values"])
    out["ours_image_encoder_s"] = round(P._best(lambda: enc(model.params, pix).block_until_ready(), 2), 3)
    return out


def probe(args) -> dict:
    """Decode rates of ours only (for the XLA option sweep, run in a fresh process per option set)."""
    import deepseek_vl_jax as D

    model = D.load_pretrained(args.checkpoint, progress=False)
    runner = Runner(model, None)
    out = {}
    for b in (1, 8):
        batch = text_batch(b, 64)
        runner.run_ours(batch, 8)
        out[f"ours_batch{b}_tokens_per_s"] = round(runner.decode_rate(batch, 8, 40, 2, "ours"), 2)
    return out


SWEEP = {
    "default": "",
    "legacy_runtime (--xla_cpu_use_thunk_runtime=false)": "--xla_cpu_use_thunk_runtime=false",
    "single_thread_eigen (--xla_cpu_multi_thread_eigen=false)": "--xla_cpu_multi_thread_eigen=false",
    "onednn (--xla_cpu_use_onednn=true)": "--xla_cpu_use_onednn=true",
    "xnnpack (--xla_cpu_use_xnnpack=true)": "--xla_cpu_use_xnnpack=true",
    "no_xnnpack (--xla_cpu_use_xnnpack=false)": "--xla_cpu_use_xnnpack=false",
    "fast_math (--xla_cpu_enable_fast_math=true)": "--xla_cpu_enable_fast_math=true",
    # jaxlib 0.10.2 hands float32 dots to YNNPACK by default (`ynn_fusion` in the compiled HLO); these dot paths
    # replace it (the flags this jaxlib knows: `strings libjax_common.so | grep '^xla_cpu_'`)
    "no_ynn_dot (--xla_cpu_experimental_ynn_fusion_type=)": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnn_dot (ynn off, --xla_cpu_experimental_xnn_fusion_type=dot)":
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type=dot",
    "onednn_dot (ynn off, --xla_cpu_experimental_onednn_fusion_type=dot)":
        "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
}


def sweep(args) -> dict:
    results = {}
    for name, flags in SWEEP.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--probe", "--checkpoint", args.checkpoint], env=env,
                             capture_output=True, text=True, timeout=900)
        if run.returncode == 0:
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        else:
            results[name] = {"error": (run.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"  sweep {name}: {results[name]}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b", help="where the random checkpoint is cached")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paired-rounds", type=int, default=5,
                        help="rounds of (bandwidth, batch-1 decode) measured back to back")
    parser.add_argument("--sweep", action="store_true", help="also time XLA CPU option sets (subprocesses)")
    parser.add_argument("--sweep-only", action="store_true", help="run only the sweep, merged into the results file")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: emulate an AVX2 machine (XLA, torch, oneDNN, MKL limited to AVX2)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown")
    parser.add_argument("--paired-only", action="store_true",
                        help="rerun only the paired batch-1 roofline rounds, merged into this machine's entry")
    parser.add_argument("--breakdown-only", action="store_true",
                        help="rerun only the profiled breakdown, merged into this machine's entry")
    parser.add_argument("--speed-only", action="store_true",
                        help="skip the compilation count, layout experiments and bfloat16 (a shorter run)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate.json"))
    args = parser.parse_args(argv)
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in P.AVX2_ENV.items()):
        # the flags are read once, when the libraries load: run again in a process that has them from the start
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv or sys.argv[1:]),
                  dict(os.environ, **P.AVX2_ENV))
    build_checkpoint(args.checkpoint)
    if args.probe:
        print(json.dumps(probe(args)))
        return 0
    if args.sweep_only:
        with open(args.out) as f:
            result = json.load(f)
        result["xla_cpu_option_sweep"] = sweep(args)
        result["xla_cpu_option_sweep"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        return 0

    import jax
    import numpy as np
    import torch
    import transformers

    import deepseek_vl_jax as D
    from deepseek_vl_jax import generation as G

    start = time.perf_counter()
    r = args.repeats
    result = {
        "benchmark": "greedy generation, deepseek_vl_jax vs transformers, same process, same random weights",
        "model": {"text": TEXT, "vision": VISION, "image_tokens": NUM_IMAGE_TOKENS, "tie_word_embeddings": False,
                  "dtype": "float32"},
        "environment": {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
                        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                        "xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "cpu_dot_policy": {"options_below_many_rows": G.loop.CPU_DOT_POLICY.options(1),
                                           "options_from_many_rows": G.loop.CPU_DOT_POLICY.options(10**9),
                                           "many_rows_from": G.loop.CPU_DOT_POLICY.many_rows_from},
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "machine": P.machine(),
        "method": "decode rate = (t(long) - t(short)) / (long - short) steps, each t best of --repeats full "
                  "generate calls (prefill cancels); eos disabled; time to first token = generate with 1 new token",
    }
    print("bandwidth ...", flush=True)
    result["bandwidth"] = bw = measure_bandwidth()
    result["gemm_GFLOPs"] = P.gemm_rates()
    bandwidth = bw["read_GBps"] * 1e9

    t0 = time.perf_counter()
    hf = transformers.DeepseekVLForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = D.load_pretrained(args.checkpoint, progress=False)
    ours_load = time.perf_counter() - t0
    result["load_s"] = {"ours": round(ours_load, 2), "transformers": round(hf_load, 2)}
    result["sizes"] = sizes = weight_bytes(ours)
    runner = Runner(ours, hf)
    result["transformers_threads"] = pick_torch_threads(hf)
    if args.breakdown_only or args.paired_only:
        with open(args.out) as f:
            stored = json.load(f)
        entry = stored["machines"][P.machine_key(result["machine"])]
        if args.paired_only:
            entry["decode_batch1_paired_roofline"] = pr = paired_roofline(
                ours, image_batch(40), 40, args.paired_rounds, sizes["decode_weight_bytes"], TEXT["pad_token_id"])
            pr["load_average_at_start_end"] = [result["environment"]["load_average_at_start"],
                                               [round(x, 2) for x in os.getloadavg()]]
            print(json.dumps(pr, indent=1))
        else:
            entry["breakdown"] = breakdown(ours, hf, image_batch(40), text_batch(8, 64, seed=1))
            entry["breakdown"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        with open(args.out, "w") as f:
            json.dump(stored, f, indent=2)
            f.write("\n")
        return 0

    # First call: splitting the layers + compiling prefill and the decode loop (one bucket).
    img = image_batch(40)
    prompt_len = img["input_ids"].shape[1]
    count0 = G.compile_count()
    t0 = time.perf_counter()
    first = runner.run_ours(img, 8)
    first_call = time.perf_counter() - t0
    steady = best_time(lambda: runner.run_ours(img, 8), r)
    result["first_call"] = {"prompt_tokens": prompt_len, "bucket": G.bucket_length(prompt_len),
                            "first_call_s": round(first_call, 2), "same_call_compiled_s": round(steady, 2),
                            "compile_and_layer_split_s": round(first_call - steady, 2),
                            "compilations": G.compile_count() - count0}

    print("correctness ...", flush=True)
    hf_tokens = runner.run_hf(img, 8)
    agree = lambda a, b: int(np.argmin(np.append(a[0] == b[0], False)))  # length of the common prefix
    result["greedy_tokens_agreeing_with_transformers_image_prompt"] = f"{agree(first, hf_tokens)}/8"

    print("time to first token ...", flush=True)
    ttft_ours = best_time(lambda: runner.run_ours(img, 1), r)
    ttft_hf = best_time(lambda: runner.run_hf(img, 1), r)
    result["time_to_first_token_s"] = {"prompt_tokens": prompt_len, "images": 1, "ours": round(ttft_ours, 3),
                                       "transformers": round(ttft_hf, 3),
                                       "speedup_ours_over_transformers": round(ttft_hf / ttft_ours, 3)}

    print("batch-1 decode ...", flush=True)
    short, long = 8, 40
    ours_b1 = runner.decode_rate(img, short, long, r, "ours")
    hf_b1 = runner.decode_rate(img, short, long, r, "hf")
    roof = bandwidth / sizes["decode_weight_bytes"]
    roof_kv = bandwidth / (sizes["decode_weight_bytes"] + kv_bytes(ours.config, prompt_len + (short + long) // 2))
    result["decode_batch1"] = {
        "context_tokens": f"{prompt_len + short}..{prompt_len + long}",
        "ours_tokens_per_s": round(ours_b1, 2), "transformers_tokens_per_s": round(hf_b1, 2),
        "speedup_ours_over_transformers": round(ours_b1 / hf_b1, 3),
        "roofline_tokens_per_s (weights / read_GBps)": round(roof, 2),
        "ours_fraction_of_roofline": round(ours_b1 / roof, 3), "transformers_fraction_of_roofline": round(hf_b1 / roof, 3),
        "ours_fraction_of_roofline_incl_kv_cache_reads": round(ours_b1 / roof_kv, 3),
    }

    print("batch-1 decode beside the bandwidth, paired ...", flush=True)
    result["decode_batch1_paired_roofline"] = paired_roofline(ours, img, long, args.paired_rounds,
                                                              sizes["decode_weight_bytes"], TEXT["pad_token_id"])

    print("batch-8 decode ...", flush=True)
    b8 = text_batch(8, 64, seed=1)
    runner.run_ours(b8, short)
    ours_b8 = runner.decode_rate(b8, short, long, r, "ours")
    hf_b8 = runner.decode_rate(b8, short, long, r, "hf")
    result["decode_batch8"] = {"prompt": "8 text-only prompts of 64 tokens",
                               "ours_tokens_per_s": round(ours_b8, 2), "transformers_tokens_per_s": round(hf_b8, 2),
                               "speedup_ours_over_transformers": round(ours_b8 / hf_b8, 3),
                               "ours_vs_own_batch1": round(ours_b8 / ours_b1, 2)}

    if not args.no_profile:
        print("profile ...", flush=True)
        result["breakdown"] = breakdown(ours, hf, img, b8)
    print("attention and dot forms ...", flush=True)
    result["attention_forms_ms"] = P.attention_forms()
    result["decode_dot_forms"] = P.decode_dot_forms()
    if args.speed_only:
        return write(args, result, start)

    print("compilations over varied prompts ...", flush=True)
    lengths = [3, 17, 30, 41, 58, 77, 90, 120, 150]
    buckets = sorted({G.bucket_length(1 + NUM_IMAGE_TOKENS + n) for n in lengths})
    before = G.compile_count()
    t0 = time.perf_counter()
    for i, n in enumerate(lengths):
        runner.run_ours(image_batch(n, seed=i), 4 + i % 3)
    result["compilations_over_varied_prompts"] = {
        "prompt_tokens": [1 + NUM_IMAGE_TOKENS + n for n in lengths], "buckets": buckets,
        "new_compilations": G.compile_count() - before,
        "expected_new_compilations (one per bucket not yet compiled)":
            len([b for b in buckets if b != result["first_call"]["bucket"]]),
        "wall_s": round(time.perf_counter() - t0, 1)}

    print("layouts ...", flush=True)
    result["experiments"] = {"decoder_layer_layout": layer_layout_experiment(ours),
                             "matmul_layout": matmul_layout_experiment()}

    print("bfloat16 ...", flush=True)
    bf16 = D.load_pretrained(args.checkpoint, dtype="bfloat16", progress=False)
    small = text_batch(1, 32, seed=2)
    f32_tokens = runner.run_ours(small, 16)
    bf_tokens = runner.run_ours(small, 16, model=bf16)
    logits32 = np.asarray(ours(**small))[:, -1]
    logits16 = np.asarray(bf16(**small))[:, -1]
    hf16 = transformers.DeepseekVLForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    hf_bf_tokens = runner.run_hf(small, 16, model=hf16)
    bf_rate = runner.decode_rate(small, 4, 40, 3, "ours", model=bf16)
    hf_bf_rate = runner.decode_rate(small, 4, 40, 3, "hf", model=hf16)
    result["bfloat16"] = {
        "prompt": "1 text-only prompt of 32 tokens",
        "last_logits_max_rel_err_vs_float32": round(float(np.abs(logits16 - logits32).max() / np.abs(logits32).max()), 4),
        "greedy_tokens_agreeing_with_float32_prefix": f"{agree(bf_tokens, f32_tokens)}/16",
        "transformers_bf16_agreeing_with_float32_prefix": f"{agree(hf_bf_tokens, f32_tokens)}/16",
        "ours_decode_tokens_per_s": round(bf_rate, 2), "transformers_decode_tokens_per_s": round(hf_bf_rate, 2),
        "ours_bf16_vs_ours_float32_batch1": round(bf_rate / ours_b1, 3),
        "note": "the CPU default stays float32; on this random-init model (nearly flat logits) bf16 greedy tokens "
                "leave float32's after a few steps, transformers' bf16 too",
    }
    del bf16, hf16

    return write(args, result, start)


def write(args, result: dict, start: float) -> int:
    """Store `result` under this machine's key in --out (other machines' entries kept) and print a summary."""
    previous = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    machines = previous.get("machines") or ({UNRECORDED: previous} if previous else {})
    key = P.machine_key(result["machine"])
    before = machines.get(key, {})
    if args.sweep:
        print("XLA CPU option sweep (subprocesses) ...", flush=True)
        result["xla_cpu_option_sweep"] = sweep(args)
    elif "xla_cpu_option_sweep" in before:
        result["xla_cpu_option_sweep"] = before["xla_cpu_option_sweep"]
    if "notes" in before:
        result["notes"] = before["notes"]
    if "breakdown" not in result and "breakdown" in before:  # --no-profile keeps the last profiled breakdown
        result["breakdown"] = dict(before["breakdown"], from_an_earlier_run=True)
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    result["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    machines[key] = result
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": result["benchmark"], "keyed_by": "CPU model / best vector extension / cores "
                   "[/ emulated ISA]: figures from different machines never mix", "machines": machines}, f, indent=2)
        f.write("\n")

    d1, d8, tt = result["decode_batch1"], result["decode_batch8"], result["time_to_first_token_s"]
    print(f"batch-1 decode: ours {d1['ours_tokens_per_s']} tok/s, transformers {d1['transformers_tokens_per_s']} "
          f"tok/s -> {d1['speedup_ours_over_transformers']}x; roofline {d1['roofline_tokens_per_s (weights / read_GBps)']}"
          f" tok/s: ours {d1['ours_fraction_of_roofline']:.0%}, transformers {d1['transformers_fraction_of_roofline']:.0%}"
          f" ({d1['ours_fraction_of_roofline_incl_kv_cache_reads']:.0%} counting the KV cache reads)")
    if "decode_batch1_paired_roofline" in result:
        pr = result["decode_batch1_paired_roofline"]
        print(f"batch-1 decode beside its bandwidth, {len(pr['rounds'])} rounds: "
              + ", ".join(f"{r['ours_tokens_per_s']} tok/s at {r['read_GBps']} GB/s" for r in pr["rounds"])
              + f" -> median {pr['median_fraction_of_roofline']:.0%} of the roofline")
    print(f"batch-8 decode: ours {d8['ours_tokens_per_s']} tok/s, transformers {d8['transformers_tokens_per_s']} tok/s"
          f" -> {d8['speedup_ours_over_transformers']}x")
    print(f"time to first token: ours {tt['ours']} s, transformers {tt['transformers']} s -> "
          f"{tt['speedup_ours_over_transformers']}x")
    print(f"machine: {key}")
    if args.speed_only:
        print(f"wrote {args.out} ({result['total_wall_s']} s)")
        return 0
    varied = result["compilations_over_varied_prompts"]
    print(f"first call {result['first_call']['first_call_s']} s (compile + split "
          f"{result['first_call']['compile_and_layer_split_s']} s); compilations over {len(varied['prompt_tokens'])} "
          f"prompts in {len(varied['buckets'])} buckets: {varied['new_compilations']}")
    print(f"bfloat16: {result['bfloat16']}")
    print(f"wrote {args.out} ({result['total_wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

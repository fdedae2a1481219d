"""Weight-only quantization: parameter bytes, memory while loading and generating, decode speed and logits error.

    python benchmarks/bench_quantize.py [--checkpoint DIR]

- Parameter bytes per scheme (float32, int8, int4 group 128) for the DeepSeek-VL-1.3B and DeepSeek-VL-7B-hybrid
  shapes, by `jax.eval_shape` (nothing allocated), decoder (q/k/v/o, gate/up/down) and whole model.
- On the benchmark shape of bench_generate.py (~0.45B, random weights; the same cached checkpoint), one fresh
  subprocess per mode (float32; float32 with today's fused per-layer copy; int8; int4): peak host memory while
  loading (VmHWM over the load, minus the process's footprint before it), then the peak while generating (VmHWM
  reset after loading) against parameter bytes + KV cache, batch-1 decode tokens/s (difference of two generation
  lengths, prefill cancels, best of --repeats) and the last 32 positions' logits of an image prompt, compared with
  float32 (max |error| / max |logit|, top-1 agreement).
Writes benchmarks/results/quantize.json.
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

MODES = ("float32", "float32_fused_copy", "int8", "int4")
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
    from deepseek_vl_jax.generation import kv_cache, weights
    from deepseek_vl_jax.generation.inputs import prepare_inputs

    jax.numpy.zeros(1).block_until_ready()
    before = status_kb("VmRSS")
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
    if mode == "float32_fused_copy":  # today's layout: q/k/v and gate/up concatenated into new buffers
        model.__dict__["_generation_params"] = (model.params, weights.split_layers(model.params, fuse=True))
    batch = image_batch(16)
    runner = Runner(model, None)
    inputs, _ = prepare_inputs(model, batch, LONG)
    t = model.config.text
    slots = inputs["input_ids"].shape[1] + kv_cache.gen_buffer_length(LONG)
    cache_bytes = 2 * t.num_hidden_layers * t.num_key_value_heads * slots * t.head_dim * 4
    runner.run_ours(batch, SHORT)  # compile both lengths' programs (one bucket) before measuring
    runner.run_ours(batch, LONG)
    before_gen = status_kb("VmRSS")
    reset_peak()
    rate = runner.decode_rate(batch, SHORT, LONG, repeats, "ours")
    gen_peak = status_kb("VmHWM")
    logits = np.asarray(model(**batch))[0, -32:]
    np.save(out + ".npy", logits)
    result = {
        "mode": mode, "load_seconds": load_s, "param_bytes": param_bytes, "largest_tensor_float32_bytes": largest,
        "load_peak_bytes_over_start": load_peak,
        "load_peak_ratio_to_params_plus_one_tensor": load_peak / (param_bytes + largest),
        "process_rss_before_load_bytes": before, "rss_before_generate_bytes": before_gen,
        "generate_peak_bytes": gen_peak, "generate_peak_over_start_bytes": gen_peak - before,
        "kv_cache_bytes": cache_bytes,
        "generate_peak_ratio_to_params_plus_cache": (gen_peak - before) / (param_bytes + cache_bytes),
        "decode_tokens_per_s": rate,
    }
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="/tmp/dsvl_bench_045b", help="the cached random checkpoint "
                   "(built by bench_generate.build_checkpoint if absent)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("MODE", "OUT"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.checkpoint, args.child[1], args.repeats)
        return
    import numpy as np

    from bench_generate import TEXT, VISION, build_checkpoint

    build_checkpoint(args.checkpoint)
    load_start = os.getloadavg()
    runs = {}
    for mode in MODES:
        out = f"/tmp/bench_quantize_{mode}.json"
        subprocess.run([sys.executable, os.path.abspath(__file__), "--checkpoint", args.checkpoint,
                        "--repeats", str(args.repeats), "--child", mode, out], check=True)
        with open(out) as f:
            runs[mode] = json.load(f)
        print(json.dumps(runs[mode]), flush=True)
    ref = np.load("/tmp/bench_quantize_float32.json.npy")
    for mode in MODES:
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
        "environment": {"python": platform.python_version(), "jax": jax.__version__,
                        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
        "method": "each mode in a fresh subprocess; peaks are /proc/self/status VmHWM (reset through clear_refs) "
                  "minus VmRSS before loading; int4 group size 128; scales float32",
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "quantize.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result["model_shapes_by_eval_shape"], indent=1))


if __name__ == "__main__":
    main()

"""Checkpoint conversion throughput and peak memory on a DeepSeek-VL-1.3B-shaped checkpoint in bfloat16.

    python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--keep]

Builds the checkpoint with transformers (SigLIP-L/16 at 384 px: hidden 1024, 24 layers, 16 heads, MLP 4096;
LLaMA: 24 layers, hidden 2048, 16 heads, MLP 5632, vocabulary 102400, untied head; ~2.0 B parameters, ~3.9 GB):
built on the meta device, materialised empty in bfloat16, filled with random values, `save_pretrained`.
Then runs, each as its own process (`deepseek-vl-jax ...` via `python -m deepseek_vl_jax.cli`):
  convert HF -> Flax, export Flax -> HF (one 5 GB shard and 2 GB shards), and checks the round trip is
bit-identical. Reports wall time, throughput (checkpoint bytes / wall time, with and without the ~fixed process
start-up: interpreter, JAX, model tracing) and peak RSS of each process (`ru_maxrss` of the finished child),
also as a multiple of the checkpoint's bytes, and writes benchmarks/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torchvision_ops  # noqa: E402  transformers imports torchvision: see tests/torchvision_ops.py

torchvision_ops.ensure_importable()

TEXT = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-6)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=384, patch_size=16, hidden_act="gelu", vision_use_head=False)


def build(directory: str) -> None:
    import torch
    import transformers

    config = transformers.DeepseekVLConfig(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.DeepseekVLForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.save_pretrained(directory)  # transformers' default sharding
    del model


def dir_bytes(directory: str, suffix: str = "") -> int:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(suffix))
    return total


def run_child(args: list[str]) -> dict:
    """Run one CLI command in a fresh process: wall seconds and its peak RSS (ru_maxrss of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepseek_vl_jax.cli", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        raise RuntimeError("ru_maxrss of children did not grow; run each measurement in a fresh benchmark process")
    return {"seconds": round(wall, 2), "peak_rss_bytes": peak_kb * 1024}


def startup_child(hf: str) -> dict:
    """The fixed cost of a convert process without the data: interpreter, imports, tracing the model's shapes."""
    code = ("from deepseek_vl_jax.conversion import flax_checkpoint\n"
            "from deepseek_vl_jax.config import ModelConfig\n"
            f"flax_checkpoint.abstract(ModelConfig.from_pretrained({hf!r}))\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return {"seconds": round(time.perf_counter() - start, 2),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def measure(args_list: list[str]) -> dict:
    """Each measurement in its own benchmark process so that ru_maxrss of children is that command's alone."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", *args_list], capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        if args.measure[0] == "startup":
            print(json.dumps(startup_child(args.measure[1])))
        else:
            print(json.dumps(run_child(args.measure)))
        return

    hf, flax = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "flax")
    os.makedirs(args.workdir, exist_ok=True)
    if not os.path.exists(os.path.join(hf, "config.json")):
        t = time.perf_counter()
        build(hf)
        print(f"built {hf} in {time.perf_counter() - t:.0f}s", flush=True)
    ckpt = dir_bytes(hf, ".safetensors")
    for d in ("flax", "back", "back_2gb"):
        shutil.rmtree(os.path.join(args.workdir, d), ignore_errors=True)

    results = {}
    load_before = os.getloadavg()
    startup = measure(["startup", hf])
    results["startup"] = startup
    for name, cmd, size_dir in (
            ("convert", ["convert", hf, flax, "--no-progress"], None),
            ("export_5GB", ["export", flax, os.path.join(args.workdir, "back"), "--no-progress"], None),
            ("export_2GB", ["export", flax, os.path.join(args.workdir, "back_2gb"), "--max-shard-size", "2GB",
                            "--no-progress"], None)):
        r = measure(cmd)
        r["throughput_GB_per_s"] = round(ckpt / r["seconds"] / 1e9, 3)
        r["throughput_GB_per_s_excluding_startup"] = round(ckpt / max(r["seconds"] - startup["seconds"], 1e-9)
                                                           / 1e9, 3)
        r["peak_rss_over_checkpoint_bytes"] = round(r["peak_rss_bytes"] / ckpt, 3)
        results[name] = r
        print(name, r, flush=True)

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_conversion_helpers import tensor_differences  # noqa: E402
    identical = all(tensor_differences(hf, os.path.join(args.workdir, d)) == [] for d in ("back", "back_2gb"))
    import numpy
    import orbax.checkpoint
    import transformers
    out = {
        "benchmark": "checkpoint conversion: DeepSeek-VL-1.3B-shaped checkpoint, bfloat16, random weights",
        "model": {"text": TEXT, "vision": VISION, "tie_word_embeddings": False},
        "checkpoint_bytes": ckpt,
        "flax_checkpoint_bytes": dir_bytes(flax),
        "hf_files": sorted(f for f in os.listdir(hf) if f.endswith(".safetensors")),
        "exported_files_2GB": sorted(f for f in os.listdir(os.path.join(args.workdir, "back_2gb"))
                                     if f.endswith(".safetensors")),
        "round_trip_bit_identical": identical,
        "startup_seconds": startup["seconds"],
        "results": {k: v for k, v in results.items() if k != "startup"},
        "notes": ("peak RSS is ru_maxrss of the finished child process (includes the interpreter, JAX and the "
                  "model trace: process_baseline_rss_bytes); checkpoint files are in the page cache (warm) after "
                  "the build; the 2-core machine was shared (see load_average), so times are pessimistic"),
        "process_baseline_rss_bytes": startup["peak_rss_bytes"],
        "environment": {"python": platform.python_version(), "numpy": numpy.__version__,
                        "orbax_checkpoint": orbax.checkpoint.__version__, "transformers": transformers.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "load_average_1_5_15min_before_and_after": [load_before, os.getloadavg()]},
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "convert.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(json.dumps(out, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

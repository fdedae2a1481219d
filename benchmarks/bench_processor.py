"""Image preprocessing throughput: deepseek_vl_jax.processing vs transformers (PIL backend), same run, same images.

    python benchmarks/bench_processor.py [--images 64] [--repeats 3]

Two settings: DeepSeek-VL (384 px) and DeepSeek-VL-Hybrid (1024 px + 384 px). The images are 64 in-memory RGB photos
of realistic sizes (640x480, 1024x768, 800x600, 1280x720, 1920x1080, portrait 480x640, ...) with smooth content
(like photos, which matters little for PIL's resampling cost). Reports images/second (best of `repeats` runs) for
both (ours with its default thread pool and single-threaded), their ratios, checks the outputs agree, and writes benchmarks/results/processor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torchvision_ops  # noqa: E402  transformers imports torchvision: see tests/torchvision_ops.py

torchvision_ops.ensure_importable()

from deepseek_vl_jax.processing import DeepseekVLImageProcessor, ImageProcessorConfig  # noqa: E402

SIZES = [(640, 480), (1024, 768), (800, 600), (1280, 720), (1920, 1080), (480, 640), (500, 375), (1200, 1600)]


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        # smooth gradients + low-amplitude noise: photo-like statistics
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
        noise = rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


def best_rate(fn, images, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(images)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best, out


def bench(kind: str, images, repeats: int) -> dict:
    if kind == "deepseek_vl":
        from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil as C
    else:
        from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
            DeepseekVLHybridImageProcessorPil as C,
        )
    hf = C()
    config = ImageProcessorConfig.from_dict(hf.to_dict(), hybrid=(kind != "deepseek_vl"))
    ours = DeepseekVLImageProcessor(config)  # threads = CPU count
    ours_single = DeepseekVLImageProcessor(config, num_threads=1)

    def run_hf(ims):
        return hf(ims, return_tensors="np")

    hf_rate, hf_out = best_rate(run_hf, images, repeats)
    ours_rate, ours_out = best_rate(ours, images, repeats)
    single_rate, _ = best_rate(ours_single, images, repeats)
    max_diff = 0.0
    for key in ours_out:
        ref = np.asarray(hf_out[key])
        assert ref.shape == ours_out[key].shape, (key, ref.shape, ours_out[key].shape)
        max_diff = max(max_diff, float(np.abs(ref - ours_out[key]).max()))
    return {
        "ours_images_per_s": round(ours_rate, 2),
        "hf_images_per_s": round(hf_rate, 2),
        "speedup_ours_over_hf": round(ours_rate / hf_rate, 3),
        "ours_single_thread_images_per_s": round(single_rate, 2),
        "speedup_ours_single_thread_over_hf": round(single_rate / hf_rate, 3),
        "ours_threads": ours.num_threads,
        "max_abs_diff": max_diff,
        "output_shapes": {k: list(v.shape) for k, v in ours_out.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "processor.json"))
    args = parser.parse_args()

    import PIL
    import transformers

    images = make_images(args.images)
    results = {
        "benchmark": "image preprocessing throughput (images/s, best of repeats), ours vs transformers PIL backend",
        "num_images": len(images),
        "image_sizes_wxh": sorted({f"{w}x{h}" for w, h in SIZES[: len(images)]}),
        "repeats": args.repeats,
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    for kind in ("deepseek_vl", "deepseek_vl_hybrid"):
        results[kind] = bench(kind, images, args.repeats)
        r = results[kind]
        print(
            f"{kind:20s} ours {r['ours_images_per_s']:8.2f} img/s   hf {r['hf_images_per_s']:8.2f} img/s   "
            f"x{r['speedup_ours_over_hf']:.2f}   (1 thread: {r['ours_single_thread_images_per_s']:.2f} img/s, "
            f"x{r['speedup_ours_single_thread_over_hf']:.2f})   max|diff| {r['max_abs_diff']:.2e}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Shared helpers of the training tests (no tests here): a tiny model directory (HF checkpoint + processor files
that agree on the vocabulary and the image token), a tiny dataset with images, and small configs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import atexit

import numpy as np

import hf_fixtures as F
import processing_fixtures as PF

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = tempfile.mkdtemp(prefix="dsvl_train_")
atexit.register(shutil.rmtree, _ROOT, True)

ANSWERS = ["A cat.", "A dog on a sofa.", "Red.", "It is a picture of the quick brown fox.", "Two.", "Hello there."]
QUESTIONS = ["What is this?", "Describe this image.", "What colour is it?", "What do you see?", "How many?", "Hi?"]


def scratch(name: str) -> str:
    path = tempfile.mkdtemp(prefix=name + "_", dir=_ROOT)
    return path


@functools.lru_cache(maxsize=None)
def model_dir(hybrid: bool = False, tie: bool = True) -> str:
    """A tiny HF DeepSeek-VL(-Hybrid) checkpoint directory with matching processor files (4 image tokens)."""
    from deepseek_vl_jax.processing import load_processor

    path = os.path.join(_ROOT, f"model_{'hybrid' if hybrid else 'vl'}_{tie}")
    PF.make_processor_dir(path, hybrid=hybrid, image_size=32, high_res_size=64, num_image_tokens=4)
    proc = load_processor(path)
    vocab = proc.tokenizer.get_vocab_size()
    cfg = F.make_config(hybrid=hybrid, text={"vocab_size": vocab + 10}, vision={"patch_size": 16},
                        sam={"image_size": 64}, tie=tie)
    cfg.image_token_id = proc.image_token_id
    F.save(F.make_model(cfg, seed=1), path)
    return path


def write_image(path: str, seed: int, size=(40, 36)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def chat(image: str | None, question: str, answer: str) -> list:
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def write_dataset(directory: str, n: int = 16, seed: int = 0, bad_lines: dict[int, str] | None = None,
                  name: str = "train.jsonl") -> str:
    """n rows (every other with an image, in `images/`); `bad_lines` {line: raw text} replaces those lines."""
    os.makedirs(directory, exist_ok=True)
    lines = []
    for i in range(n):
        image = None
        if i % 2 == 0:
            image = f"images/{seed}_{i}.png"
            write_image(os.path.join(directory, image), seed * 1000 + i)
        lines.append(json.dumps({"messages": chat(image, f"{QUESTIONS[i % len(QUESTIONS)]} ({i})",
                                                  ANSWERS[(i + seed) % len(ANSWERS)])}))
    for line, text in (bad_lines or {}).items():
        lines.insert(line - 1, text)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def tiny_config(**sections):
    """A TrainConfig for tiny runs: float32, no progress bar, batch 4, lr 1e-3."""
    from deepseek_vl_jax.training.config import from_dict, TrainConfig

    d = {"steps": 4, "log_every": 1, "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
         "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0, "clip_grad_norm": 1.0, "weight_decay": 0.01},
         "data": {"batch_size": 4, "max_length": 96, "length_buckets": [32, 64], "num_threads": 2},
         "checkpoint": {"every": 2, "keep": 5}, "logging": {"progress": False, "peak_flops_per_device": 1e9}}
    for key, value in sections.items():
        if isinstance(value, dict):
            d.setdefault(key, {}).update(value)
        else:
            d[key] = value
    return from_dict(TrainConfig, d)


def read_metrics(out_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(out_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(devices: int) -> dict:
    env = dict(os.environ)
    # LLVM's -O0 halves compile time of these tiny programs; every process of a comparison uses the same flags
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_ROOT, "jax_cache")  # later runs reuse the compiled steps
    return env


def start_cli(args: list[str], devices: int, log_path: str) -> subprocess.Popen:
    """`deepseek-vl-jax train ...` in a fresh process with `devices` simulated CPU devices."""
    code = ("import jax, sys; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "from deepseek_vl_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", code, "train", *args], env=cli_env(devices), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)

"""Helpers shared by the conversion tests: tiny HF checkpoint directories (transformers weights + a tiny processor),
tensor-by-tensor comparison of two HF directories. The test at the bottom checks the comparison itself."""

from __future__ import annotations

import json
import os

import numpy as np

import hf_fixtures as F
import processing_fixtures as P
from deepseek_vl_jax.safetensors_io import INDEX_FILE, CheckpointReader, SafetensorsFile, write_safetensors

GELU_VISION = {"hidden_act": "gelu"}  # what the original layout can express (timm's ViT: exact GELU)


def make_hf_dir(path, hybrid: bool, tie: bool, max_shard_size: str | None = None, seed: int = 0,
                vision: dict | None = None, processor: bool = True):
    """Save a tiny transformers DeepSeek-VL(-Hybrid) (+ processor files) at `path`: (hf config, model, path)."""
    cfg = F.make_config(hybrid=hybrid, tie=tie, vision=vision)
    model = F.make_model(cfg, seed=seed)
    F.save(model, path, max_shard_size=max_shard_size)
    if processor:
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        P.make_processor_dir(path, hybrid=hybrid, image_size=cfg.vision_config.image_size, high_res_size=64,
                             num_image_tokens=n)
    return cfg, model, str(path)


def tensor_differences(a_dir, b_dir) -> list[str]:
    """Every difference between the tensors of two HF directories: key sets, dtypes, shapes, raw bytes."""
    a, b = CheckpointReader(a_dir), CheckpointReader(b_dir)
    problems = [f"only in {a_dir}: {k}" for k in sorted(set(a.keys()) - set(b.keys()))]
    problems += [f"only in {b_dir}: {k}" for k in sorted(set(b.keys()) - set(a.keys()))]
    for k in sorted(set(a.keys()) & set(b.keys())):
        x, y = a.get(k), b.get(k)
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            problems.append(f"{k}: bytes differ")
    return problems


def weight_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def edit_tensor(directory, key, fn) -> None:
    """Replace tensor `key` of an HF directory by fn(old) (rewrites the file that holds it)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            name = json.load(f)["weight_map"][key]
    else:
        name = "model.safetensors"
    path = os.path.join(directory, name)
    f = SafetensorsFile(path)
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    tensors[key] = fn(tensors[key])
    write_safetensors(path, tensors, {"format": "pt"})


def test_tensor_differences_sees_one_changed_value(tmp_path):
    cfg, model, a = make_hf_dir(tmp_path / "a", hybrid=False, tie=True, processor=False)
    b = str(tmp_path / "b")
    F.save(model, b)
    assert tensor_differences(a, b) == []
    edit_tensor(b, "model.aligner.linear1.bias", lambda x: x + np.float32(1e-7) * (np.arange(x.size) == 3))
    assert tensor_differences(a, b) == ["model.aligner.linear1.bias: bytes differ"]

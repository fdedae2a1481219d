"""Tiny reference checkpoints built with transformers itself (random init, every weight perturbed, save_pretrained):
the real on-disk format, no hub access. Test-only: imports torch and transformers."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, vision_use_head=False)
SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=3, num_attention_heads=2, image_size=64,
           patch_size=8, window_size=3, global_attn_indexes=[1, 2], mlp_dim=48)
IMAGE_TOKEN = 150  # inside the tiny vocabulary


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so that zero or one initialisations cannot hide a mapping mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_config(hybrid: bool = False, text: dict | None = None, vision: dict | None = None, sam: dict | None = None,
                tie: bool = True):
    text = {**TEXT, **(text or {})}
    vision = {**VISION, **(vision or {})}
    kw = dict(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, tie_word_embeddings=tie)
    if hybrid:
        return transformers.DeepseekVLHybridConfig(high_res_vision_config={**SAM, **(sam or {})}, **kw)
    return transformers.DeepseekVLConfig(**kw)


def make_model(config, seed: int = 0):
    torch.manual_seed(seed)
    cls = (transformers.DeepseekVLHybridForConditionalGeneration if config.model_type == "deepseek_vl_hybrid"
           else transformers.DeepseekVLForConditionalGeneration)
    model = perturb(cls(config).eval(), seed)
    return model


def save(model, directory: str | os.PathLike, max_shard_size: str | None = None) -> str:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    return str(directory)


def make_inputs(config, rows=((1, 0), (0, 1)), text_len: int = 5, seed: int = 0, padding: str = "right"):
    """A batch where row r holds `rows[r][0]` images and then `rows[r][1]`... simplified: rows[r] = number of
    images in that row and extra text tokens; returns numpy input_ids, attention_mask, pixel_values (and
    high_res_pixel_values for the hybrid model)."""
    rng = np.random.default_rng(seed)
    vocab = config.text_config.vocab_size
    n_img_tok = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    seqs, n_images = [], 0
    for r, (images, extra) in enumerate(rows):
        seq = list(rng.integers(3, IMAGE_TOKEN - 1, size=2))
        for _ in range(images):
            seq += [IMAGE_TOKEN] * n_img_tok + list(rng.integers(3, IMAGE_TOKEN - 1, size=2))
        seq += list(rng.integers(3, IMAGE_TOKEN - 1, size=text_len + extra))
        seqs.append(seq)
        n_images += images
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int64)
    mask = np.zeros((len(seqs), t), np.int64)
    for r, s in enumerate(seqs):
        if padding == "right":
            ids[r, :len(s)], mask[r, :len(s)] = s, 1
        else:
            ids[r, t - len(s):], mask[r, t - len(s):] = s, 1
    out = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        v = config.vision_config
        out["pixel_values"] = rng.standard_normal((n_images, 3, v.image_size, v.image_size)).astype(np.float32)
        if config.model_type == "deepseek_vl_hybrid":
            h = config.high_res_vision_config
            out["high_res_pixel_values"] = rng.standard_normal(
                (n_images, 3, h.image_size, h.image_size)).astype(np.float32)
    return out


def torch_logits(model, inputs: dict, position_ids: np.ndarray | None = None) -> np.ndarray:
    kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if position_ids is not None:
        kw["position_ids"] = torch.from_numpy(position_ids)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def mask_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions the way this library (and HF generate) derives them: cumsum(mask) - 1, padding at 0."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)


def max_rel_err(ours, ref, mask: np.ndarray | None = None) -> float:
    """max |ours - ref| / max |ref| over the positions where mask [B, T] is 1."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        ours, ref = ours[keep], ref[keep]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))

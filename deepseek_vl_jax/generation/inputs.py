"""Host-side preparation of a processor batch for the compiled programs: checks, re-padding (left) to the
prompt-length bucket, image count padded to a power of two, eos ids, device placement."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_vl_jax import common, sharding
from deepseek_vl_jax.generation import kv_cache

MAX_EOS = 8  # eos ids are padded to a fixed-size array so different eos sets share one compilation


def resolve_eos(eos_token_id, config_eos) -> tuple[int, ...]:
    """None -> the model's own eos (int or tuple); -1 or [] -> no stopping."""
    value = config_eos if eos_token_id is None else eos_token_id
    if value is None:
        return ()
    ids = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    return tuple(int(i) for i in ids if int(i) >= 0)


def _left_pad(ids: np.ndarray, mask: np.ndarray, length: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens (mask 1, in order) to the right end of a [B, length] array."""
    out_ids = np.full((ids.shape[0], length), fill, np.int32)
    out_mask = np.zeros((ids.shape[0], length), np.int32)
    for r in range(ids.shape[0]):
        real = ids[r][mask[r].astype(bool)]
        if len(real):
            out_ids[r, length - len(real):] = real
            out_mask[r, length - len(real):] = 1
    return out_ids, out_mask


def _pad_images(pixels, count: int):
    if pixels is None:
        return None
    pixels = np.asarray(pixels, np.float32)
    if pixels.shape[0] == count:
        return pixels
    return np.concatenate([pixels, np.zeros((count - pixels.shape[0], *pixels.shape[1:]), np.float32)])


def prepare_inputs(model, batch: Mapping[str, Any], max_new_tokens: int) -> tuple[dict, int]:
    """Host-side checks and padding. Returns (inputs for the compiled programs, longest real prompt length)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    c = model.config
    ids = np.asarray(batch["input_ids"])
    mask = batch.get("attention_mask")
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask)
    pixels, high_res = batch.get("pixel_values"), batch.get("high_res_pixel_values")
    model.check_inputs(ids, pixels, high_res if c.is_hybrid else None)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    lengths = mask.astype(bool).sum(-1)
    if lengths.min() == 0:
        raise ValueError(f"row {int(np.argmin(lengths))} of the batch has no tokens (attention_mask all 0)")
    longest = int(lengths.max())
    limit = c.text.max_position_embeddings
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} positions "
            f"exceeds the model's max_position_embeddings={limit}")
    fill = 0 if c.image_token_id != 0 else 1
    ids, mask = _left_pad(ids, mask, kv_cache.bucket_length(longest), fill)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if pixels is not None and np.shape(pixels)[0] > 0:
        n = np.shape(pixels)[0]
        count = 1 << (n - 1).bit_length()
        inputs["pixel_values"] = _pad_images(pixels, count)
        if c.is_hybrid:
            inputs["high_res_pixel_values"] = _pad_images(high_res, count)
    return inputs, longest


def place(inputs: dict, mesh) -> dict:
    """Shard the token arrays' batch over (data, fsdp) when it divides; images replicated."""
    if mesh is None:
        return {k: jax.device_put(v) for k, v in inputs.items()}  # numpy arrays: a copy (jnp.asarray compiles one)
    out = {}
    for k, v in inputs.items():
        spec = PartitionSpec()
        if k in ("input_ids", "attention_mask"):
            spec = sharding.spec_for((common.BATCH, common.LENGTH), v.shape, mesh)
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return out

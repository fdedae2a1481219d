"""Model FLOPs of a training step, and the peak FLOP/s that MFU divides by.

Model FLOPs count the math the step needs, not what the hardware runs (recomputation from remat is not counted, so
this is MFU, not HFU). A matmul with W weights applied to one token costs 2W in the forward pass, 2W for the
gradient of its input and 2W for the gradient of its weights: 6W per token for a tower that trains. Per tower:

    multiplier = 2 (forward) + 2 (input gradient: the tower or any tower feeding it trains) + 2 (it trains)

so a frozen vision tower costs 2W per patch (nothing below it needs a gradient), a frozen language model under a
trainable aligner 4W per token. LoRA adapters inside a frozen tower make it back-propagate too (4W: the gradient
reaches every adapted layer), and every tower after it; each adapter (A [I, r], B [r, O]) adds 6 r (I + O) per
token it applies to (forward, input and weight gradients). Towers and what they apply to:

    language model  per token (images' tokens included): L (2DNH + 2DKH + 3DF) + VD (LM head)
                    attention per sequence of n tokens: L * 4 n^2 N H (QK^T and AV, full square, the PaLM convention)
    SigLIP          per patch (P per image): C p^2 Dv + Lv (4 Dv^2 + 2 Dv Fv); attention 4 Lv P^2 Dv per image
    SAM (hybrid)    per patch: C p^2 Ds + Ls (4 Ds^2 + 2 Ds Fs) + two necks (Ds Ch + 9 Ch^2 each); windowed layers
                    attend within w x w windows, global layers over all patches; the projection's strided convs
    aligner         per image token: Dv D + D D (MLP) or Dv D/2 + 4Ch D/2 + D D (hybrid)

Letters: L layers, D width, N query heads, K kv heads, H head dim, F MLP width, V vocabulary, C image channels,
p patch size. Norms, softmax, rotary embeddings, resizes and the loss are left out (a few percent at most).
"""

from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.lora.config import LoraConfig
from deepseek_vl_jax.training.config import TrainableConfig

# the towers by parameter collection, in the order activations flow through them
TOWERS = {"vision_model": "vision", "high_res_vision_model": "high_res", "aligner": "aligner",
          "language_model": "language"}


def _multipliers(trainable: TrainableConfig, adapted: frozenset = frozenset()) -> dict[str, int]:
    """FLOPs per weight and application (2, 4 or 6) of each tower; `adapted`: towers holding LoRA adapters."""
    trains = {k: bool(getattr(trainable, k)) for k in TOWERS.values()}
    grad = {k: trains[k] or k in adapted for k in trains}  # the tower's activations need gradients
    upstream = grad["vision"] or grad["high_res"]
    vision = 2 + 2 * trains["vision"] + 2 * grad["vision"]
    high_res = 2 + 2 * trains["high_res"] + 2 * grad["high_res"]
    aligner = 2 + 2 * trains["aligner"] + 2 * (grad["aligner"] or upstream)
    language = 2 + 2 * trains["language"] + 2 * (grad["language"] or grad["aligner"] or upstream)
    return {"vision": vision, "high_res": high_res, "aligner": aligner, "language": language}


@functools.lru_cache(maxsize=16)
def _adapter_widths(config: ModelConfig, lora: LoraConfig) -> dict[str, float]:
    """{tower collection: sum of r (I + O) over its adapted Dense layers} (cached: the abstract params are traced)."""
    from flax.core import meta

    from deepseek_vl_jax import lora as lora_lib
    from deepseek_vl_jax import pretrained

    params = meta.unbox(pretrained.abstract_params(config))
    widths: dict[str, float] = {}
    for path in lora_lib.targets(params, lora):
        *lead, i, o = lora_lib.adapters.get_path(params, path)["kernel"].shape
        widths[path[0]] = widths.get(path[0], 0.0) + float(lora.rank * (i + o) * math.prod(lead))
    return widths


def adapter_widths(config: ModelConfig, lora: LoraConfig | None) -> dict[str, float]:
    """{tower collection: sum of r (I + O) of its adapters}; traces the model's abstract params the first time, so
    call it once outside a mesh context (the training loop does) and it is cached."""
    return {} if lora is None or not lora.enabled else _adapter_widths(config, lora)


def adapter_flops(config: ModelConfig, lora: LoraConfig | None, lengths: Sequence[int], num_images: int) -> float:
    """6 r (I + O) per adapted Dense (per layer of a stack) and per token / patch / image token it applies to."""
    uses = {"language_model": float(sum(lengths)), "vision_model": float(num_images * config.vision.num_patches),
            "aligner": float(num_images * config.num_image_tokens)}
    if config.is_hybrid:
        uses["high_res_vision_model"] = float(num_images * (config.high_res.image_size // config.high_res.patch_size) ** 2)
    return sum(6.0 * w * uses[tower] for tower, w in adapter_widths(config, lora).items())


def language_flops_forward(config: ModelConfig, lengths: Sequence[int]) -> float:
    t = config.text
    n, k, h, d, f = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size, t.intermediate_size
    per_token = t.num_hidden_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + t.vocab_size * d
    tokens = float(sum(lengths))
    attention = sum(t.num_hidden_layers * 4.0 * float(x) ** 2 * n * h for x in lengths)
    return 2.0 * per_token * tokens + attention


def siglip_flops_forward(config: ModelConfig) -> float:
    """Forward FLOPs of SigLIP for one image."""
    v = config.vision
    p = v.num_patches
    per_patch = v.num_channels * v.patch_size ** 2 * v.hidden_size + v.num_hidden_layers * (
        4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    return 2.0 * per_patch * p + v.num_hidden_layers * 4.0 * p * p * v.hidden_size


def sam_flops_forward(config: ModelConfig) -> float:
    """Forward FLOPs of SAM, its second neck and the projection for one image (hybrid model)."""
    s = config.high_res
    g = s.image_size // s.patch_size
    patches = g * g
    ch = s.output_channels
    per_patch = s.num_channels * s.patch_size ** 2 * s.hidden_size + s.num_hidden_layers * (
        4 * s.hidden_size ** 2 + 2 * s.hidden_size * s.mlp_dim) + 2 * (s.hidden_size * ch + 9 * ch * ch)
    attention = 0.0
    for i in range(s.num_hidden_layers):
        if i in s.global_attn_indexes:
            attention += 4.0 * patches ** 2 * s.hidden_size
        else:
            windows = math.ceil(g / s.window_size) ** 2
            attention += 4.0 * windows * s.window_size ** 4 * s.hidden_size
    out = config.vision.image_size // config.vision.patch_size
    proj = (2 * out) ** 2 * 9 * ch * 2 * ch + out ** 2 * 9 * 2 * ch * 4 * ch  # conv1, conv2 of one projection
    return 2.0 * per_patch * patches + attention + 2.0 * 2 * proj  # the projection runs twice (last, global)


def aligner_flops_forward(config: ModelConfig) -> float:
    d, dv = config.text.hidden_size, config.vision.hidden_size
    if config.is_hybrid:
        per_token = dv * d // 2 + 4 * config.high_res.output_channels * d // 2 + d * d
    else:
        per_token = dv * d + d * d
    return 2.0 * per_token * config.num_image_tokens


def step_flops(config: ModelConfig, trainable: TrainableConfig, lengths: Sequence[int], num_images: int,
               lora: LoraConfig | None = None) -> float:
    """Model FLOPs of one training step: `lengths` are the real (unpadded) token counts of every row, `num_images`
    the real images (padding slots are not counted); `lora`: the run's adapters (their towers back-propagate)."""
    m = _multipliers(trainable, frozenset(TOWERS[c] for c in adapter_widths(config, lora)))
    total = m["language"] / 2 * language_flops_forward(config, lengths)
    total += num_images * m["vision"] / 2 * siglip_flops_forward(config)
    total += num_images * m["aligner"] / 2 * aligner_flops_forward(config)
    if config.is_hybrid:
        total += num_images * m["high_res"] / 2 * sam_flops_forward(config)
    return total + adapter_flops(config, lora, lengths, num_images)


def batch_flops(config: ModelConfig, trainable: TrainableConfig, attention_mask: np.ndarray,
                input_ids: np.ndarray, lora: LoraConfig | None = None) -> float:
    """`step_flops` for a collated (host) batch [A, B, T]."""
    mask = np.asarray(attention_mask).reshape(-1, np.shape(attention_mask)[-1])
    lengths = mask.sum(-1)
    lengths = lengths[lengths > 1]  # padding rows hold one token
    images = int(np.sum(np.asarray(input_ids) == config.image_token_id)) // max(config.num_image_tokens, 1)
    return step_flops(config, trainable, lengths.tolist(), images, lora)


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` [n, n] x [n, n] matmuls on the default device (measured once per process).
    On CPU this is the whole host's peak: simulated CPU devices share the same cores."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops(per_device: float | None) -> float:
    """Peak FLOP/s of the whole job: `per_device` x devices, or (None) the measured matmul peak x processes (CPU)."""
    if per_device:
        return float(per_device) * jax.device_count()
    return measure_matmul_peak() * jax.process_count()

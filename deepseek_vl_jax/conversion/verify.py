"""`deepseek-vl-jax verify A B`: run two checkpoints of the same architecture on the same seeded random inputs and
compare them module by module.

A and B may be HF directories, Flax checkpoint directories, training output directories or original deepseek-ai
directories (`multi_modality`), in any mix. Both are
run in float32 with this library's Flax model (`DeepseekVL` methods via `module.apply(..., method=...)`), so a
difference means the weights differ, not the implementations. Per module: max |A - B|, and that divided by max |B|
("max rel"); for the logits also the KL divergence KL(A || B) of the next-token distributions over the real
(non-padding) positions. Exit status 1 when any module's max rel or the max KL exceeds its threshold; the first
module in pipeline order that does is named (the others downstream of it differ as a consequence).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_vl_jax import hf_mapping, multimodal
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.conversion import flax_checkpoint
from deepseek_vl_jax.conversion.convert import handle_sigterm, report_errors

SIGLIP, SAM, PROJ, ALIGNER, DECODER, LOGITS = "SigLIP", "SAM", "neck/projection", "aligner", "decoder hidden", "logits"
ORDER = (SIGLIP, SAM, PROJ, ALIGNER, DECODER, LOGITS)  # pipeline order


@dataclasses.dataclass
class Row:
    module: str
    max_abs: float
    max_rel: float
    kl_max: float | None = None
    kl_mean: float | None = None
    failed: bool = False


def load(path: str | os.PathLike, progress: bool = False):
    """A float32 `Model` from an HF directory, a Flax checkpoint, a training output directory (latest step) or an
    original deepseek-ai directory (converted to a temporary float32 Flax checkpoint first)."""
    from deepseek_vl_jax.pretrained import Model, load_pretrained

    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file) and not flax_checkpoint.is_flax_checkpoint(path):
        from deepseek_vl_jax.conversion.convert import convert, detect_layout, read_config

        if detect_layout(read_config(path)) == "original":
            with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
                convert(path, os.path.join(tmp, "flax"), dtype="float32", progress=progress)
                return load_pretrained(os.path.join(tmp, "flax"), dtype="float32", progress=progress)
    if not flax_checkpoint.is_flax_checkpoint(path) and os.path.isdir(
            os.path.join(path, flax_checkpoint.TRAINING_CHECKPOINTS)):
        config = ModelConfig.from_pretrained(path, dtype="float32", param_dtype="float32")
        return Model(config, flax_checkpoint.restore_params(path, config, "float32"))
    return load_pretrained(path, dtype="float32", progress=progress)


def random_inputs(config: ModelConfig, seed: int = 0, batch: int = 2, text_len: int = 8) -> dict[str, np.ndarray]:
    """Each row: 2 text tokens, one image's placeholder run, `text_len` text tokens; the last row left-padded by 3."""
    rng = np.random.default_rng(seed)
    n_img = config.num_image_tokens
    vocab = config.text.vocab_size
    length = 2 + n_img + text_len
    text = rng.integers(0, vocab - 1, size=(batch, length))
    text = np.where(text >= config.image_token_id, text + 1, text)  # never the image token
    ids = text.copy()
    ids[:, 2:2 + n_img] = config.image_token_id
    mask = np.ones((batch, length), np.int32)
    if batch > 1:  # left padding in the last row: padded positions are excluded from every comparison
        pad = min(3, text_len)
        ids[-1] = np.concatenate([np.zeros(pad, ids.dtype), ids[-1, :-pad]])
        mask[-1, :pad] = 0
    v = config.vision
    out = {"input_ids": ids.astype(np.int32), "attention_mask": mask,
           "pixel_values": rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)}
    if config.is_hybrid:
        h = config.high_res
        out["high_res_pixel_values"] = rng.standard_normal(
            (batch, h.num_channels, h.image_size, h.image_size)).astype(np.float32)
    return out


@functools.lru_cache(maxsize=4)
def _intermediates(config: ModelConfig):
    """fn(params, ids, mask, pv, hpv) -> {module name: activation}, through the Flax model's methods.

    One jitted function per stage, each stage fed by the same checkpoint's previous stage (so every model is
    traced once; the SAM tower twice), cached per architecture so repeated comparisons reuse the compiled code."""
    from deepseek_vl_jax.model import DeepseekVL

    module = DeepseekVL(config)

    def stage(method):
        return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))

    def sam(m, hpv):
        return m.high_res_vision_model(hpv, keep_hidden=(config.high_res.global_attn_indexes[0] + 1,))[0]

    def decode(m, ids, mask, feats):
        embeds = multimodal.merge_image_embeddings(m.embed(ids), ids, feats, config.image_token_id)
        hidden, _ = m.decode(embeds, multimodal.positions_from_mask(mask), multimodal.causal_mask(mask))
        return hidden, m.logits(hidden)

    siglip = stage(lambda m, pv: m.vision_model(pv)[0])
    sam_fn = stage(sam)
    proj = stage(lambda m, hpv: m.high_res_features(hpv))
    aligner = stage(lambda m, low, high: m.aligner(low) if high is None else m.aligner(low, high))
    decoder = stage(decode)

    def fn(params, ids, mask, pv, hpv):
        out = {SIGLIP: siglip(params, pv)}
        high = None
        if config.is_hybrid:
            out[SAM] = sam_fn(params, hpv)
            out[PROJ] = high = proj(params, hpv)
        out[ALIGNER] = aligner(params, out[SIGLIP], high)
        out[DECODER], out[LOGITS] = decoder(params, ids, mask, out[ALIGNER])
        return out

    return fn


def _kl(a_logits: np.ndarray, b_logits: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    la = jax.nn.log_softmax(jnp.asarray(a_logits, jnp.float32), axis=-1)
    lb = jax.nn.log_softmax(jnp.asarray(b_logits, jnp.float32), axis=-1)
    kl = np.asarray(jnp.sum(jnp.exp(la) * (la - lb), axis=-1))[np.asarray(mask).astype(bool)]
    return float(kl.max()), float(kl.mean())


def weight_differences(a_params, b_params) -> dict[str, float]:
    """max |A - B| of the weights, per top-level module (language model split into embeddings/layers/head)."""
    out: dict[str, float] = {}
    fa, fb = dict(hf_mapping._flatten(a_params)), dict(hf_mapping._flatten(b_params))
    for path, x in fa.items():
        group = "/".join(path[:2] if path[0] == "language_model" else path[:1])
        d = float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(fb[path], np.float32)))) if x.size else 0.0
        out[group] = max(out.get(group, 0.0), d)
    return out


def compare(a, b, threshold: float = 1e-4, kl_threshold: float = 1e-6, seed: int = 0, batch: int = 2,
            text_len: int = 8) -> list[Row]:
    """Compare two loaded float32 Models of the same architecture; rows in pipeline order."""
    ca, cb = (m.config.replace(checkpoint_dtype=None) for m in (a, b))
    if ca != cb:
        diff = [f.name for f in dataclasses.fields(ca) if getattr(ca, f.name) != getattr(cb, f.name)]
        raise ValueError(f"the two checkpoints have different architectures (config fields differ: {diff})")
    inputs = random_inputs(a.config, seed, batch, text_len)
    fn = _intermediates(a.config)
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
            inputs.get("high_res_pixel_values"))
    ya = jax.tree.map(np.asarray, fn(a.params, *args))
    yb = jax.tree.map(np.asarray, fn(b.params, *args))
    keep = inputs["attention_mask"].astype(bool)
    rows = []
    for name in [n for n in ORDER if n in ya]:
        x, y = ya[name].astype(np.float64), yb[name].astype(np.float64)
        if name in (DECODER, LOGITS):
            x, y = x[keep], y[keep]
        err = float(np.max(np.abs(x - y)))
        rel = err / max(float(np.max(np.abs(y))), 1e-30)
        row = Row(name, err, rel, failed=not rel <= threshold)
        if name == LOGITS:
            row.kl_max, row.kl_mean = _kl(ya[name], yb[name], keep)
            row.failed = row.failed or not row.kl_max <= kl_threshold
        rows.append(row)
    return rows


def format_report(rows: list[Row], weights: dict[str, float] | None = None) -> str:
    lines = [f"{'module':<16} {'max abs':>11} {'max rel':>11}  {'KL max':>10} {'KL mean':>10}"]
    for r in rows:
        kl = f"{r.kl_max:10.3e} {r.kl_mean:10.3e}" if r.kl_max is not None else " " * 21
        lines.append(f"{r.module:<16} {r.max_abs:11.3e} {r.max_rel:11.3e}  {kl}  {'FAIL' if r.failed else 'ok'}")
    if weights:
        lines.append("weights, max |A - B| per module: " + ", ".join(f"{k} {v:.3e}" for k, v in weights.items()))
    first = next((r.module for r in rows if r.failed), None)
    lines.append(f"first divergence: {first}" if first else "all modules within the thresholds")
    return "\n".join(lines)


def verify(a_path, b_path, threshold: float = 1e-4, kl_threshold: float = 1e-6, seed: int = 0, batch: int = 2,
           text_len: int = 8) -> tuple[bool, str]:
    """Load, compare, and return (passed, report text)."""
    a, b = load(a_path), load(b_path)
    rows = compare(a, b, threshold, kl_threshold, seed, batch, text_len)
    return not any(r.failed for r in rows), format_report(rows, weight_differences(a.params, b.params))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="checkpoint A (HF directory, Flax checkpoint, training output or original "
                                  "deepseek-ai directory)")
    parser.add_argument("b", help="checkpoint B (the reference: relative errors are relative to B)")
    parser.add_argument("--threshold", type=float, default=1e-4,
                        help="largest allowed max |A - B| / max |B| per module (default 1e-4)")
    parser.add_argument("--kl-threshold", type=float, default=1e-6,
                        help="largest allowed KL(A || B) of next-token distributions (default 1e-6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=2, help="rows (one image each)")
    parser.add_argument("--text-len", type=int, default=8, help="text tokens after each image")


def run(args: Any) -> int:
    handle_sigterm()
    result: dict = {}

    def go():
        result["passed"], result["report"] = verify(args.a, args.b, args.threshold, args.kl_threshold, args.seed,
                                                    args.batch, args.text_len)

    status = report_errors(go)
    if status:
        return 2
    print(result["report"])
    if not result["passed"]:
        print("verify: FAILED (above the thresholds)", file=sys.stderr)
        return 1
    return 0

"""The vision towers' bidirectional attention (no gradient) on CPU, side by side in one process, runs interleaved:

- `now`: `layers.attention` as the towers call it (`heads_first_attention` in `layers.cpu_query_block` blocks, the
  softmax normalised after the product with the values);
- `stop32`: the form before (`jax.nn.softmax` over all keys, then the product; queries in blocks only past 1024);
- `block=B`: the form in use with other query blocks (how the logits' size matters);
- `torch_sdpa`: torch's `scaled_dot_product_attention` (what transformers' sdpa attention calls).

Shapes: SigLIP-L/16 at 384 px (576 tokens, 12 heads of 64; the 0.45B benchmark's and both published models'
low-resolution tower), SAM ViT-B at 1024 px (the hybrid's high-resolution tower): its windowed layers (25 windows
of 14 x 14) and its global layers (64 x 64 = 4096 tokens), both with their decomposed relative-position bias
computed from the queries inside each call (as `sam.py` does; the same einsums in torch).
Each sample chains 4 calls (each output the next call's queries).
`--towers`: the whole towers instead (SigLIP at the 0.45B benchmark's size, 12 layers of 768; SAM ViT-B at 1024 px
with its neck), ours with the attention in use and with the stop-32 form, and transformers' (sdpa attention).
Random weights of the same shapes on each side: these are timings; the towers' parity is in the tests.

    python benchmarks/encoder_attention.py [--rounds 11] [--shapes siglip,sam_window,sam_global] [--blocks 32,64]
    python benchmarks/encoder_attention.py --towers [--rounds 5]

Writes benchmarks/results/encoder_attention.json under this machine's key (`generate_profile.machine_key`) and the
part ("attention" or "towers"): each form's median ms per call, torch / form (> 1: faster than torch), the forms'
largest difference from torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # torchvision_ops: transformers' import of torchvision, stubbed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.generate_profile import machine, machine_key  # noqa: E402
from deepseek_vl_jax import layers, sam  # noqa: E402

CHAIN = 4
SHAPES = {  # name: (batch, (grid h, grid w), heads, head dim, relative-position bias)
    "siglip": (1, (24, 24), 12, 64, False),
    "sam_window": (25, (14, 14), 12, 64, True),
    "sam_global": (1, (64, 64), 12, 64, True),
}


def stop32_attention(q, k, v, bias, scale):
    """`layers.heads_first_attention` as it was at stop 32 (the probabilities normalised before the product)."""
    b, t, n, h = q.shape
    block = layers.prefill_block(t) if t > 1024 else t
    qg, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        logits = jnp.einsum("bnth,bnsh->bnts", qg[:, :, start:end], kt, preferred_element_type=jnp.float32) * scale
        if bias is not None:
            logits = logits + bias[:, :, start:end]
        probs = jax.nn.softmax(logits, axis=-1)
        outs.append(jnp.einsum("bnts,bnsh->bnth", probs, vt, preferred_element_type=jnp.float32))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)


def jax_forms(shape, blocks):
    b, hw, n, h, rel = shape
    t = hw[0] * hw[1]
    scale = h**-0.5
    block = layers.cpu_query_block(t)
    blocks = sorted(set(blocks) - {block, None})

    def chained(attend):
        def run(q, k, v, rh, rw):
            for _ in range(CHAIN):
                bias = sam.decomposed_rel_pos_bias(q, rh, rw, hw, hw) if rel else None
                q = attend(q, k, v, bias)
            return q
        return jax.jit(run)

    forms = {"now": chained(lambda q, k, v, bias: layers.attention(q, k, v, bias=bias, scale=scale)),
             "stop32": chained(lambda q, k, v, bias: stop32_attention(q, k, v, bias, scale))}
    for blk in blocks:
        forms[f"block={blk}"] = chained(
            lambda q, k, v, bias, blk=blk: layers.heads_first_attention(q, k, v, None, scale, bias, blk))
    return forms, block


def torch_form(shape, q, k, v, rh, rw):
    b, (gh, gw), n, h, rel = shape
    t = gh * gw
    tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (k, v))  # [B, N, T, H]
    th, tw = (torch.from_numpy(np.asarray(sam.get_rel_pos(g, g, jnp.asarray(r)))) for g, r in ((gh, rh), (gw, rw)))

    def run():
        x = torch.from_numpy(q).transpose(1, 2)
        for _ in range(CHAIN):
            bias = None
            if rel:  # transformers' SamVisionAttention.get_decomposed_rel_pos, as an additive mask
                r = x.reshape(b, n, gh, gw, h)
                rel_h = torch.einsum("bnhwc,hkc->bnhwk", r, th)
                rel_w = torch.einsum("bnhwc,wkc->bnhwk", r, tw)
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, t, t)
            x = torch.nn.functional.scaled_dot_product_attention(x, tk, tv, attn_mask=bias, scale=h**-0.5)
        return x.transpose(1, 2)
    return run


def measure(name: str, rounds: int, blocks: list[int]) -> dict:
    shape = SHAPES[name]
    b, (gh, gw), n, h, _ = shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, gh * gw, n, h)).astype(np.float32) for _ in range(3))
    rh, rw = (0.1 * rng.standard_normal((2 * g - 1, h)).astype(np.float32) for g in (gh, gw))
    forms, block = jax_forms(shape, blocks)
    args = tuple(map(jnp.asarray, (q, k, v, rh, rw)))
    compiled = {f: fn.lower(*args).compile() for f, fn in forms.items()}
    runs = {f: (lambda c=c: jax.block_until_ready(c(*args))) for f, c in compiled.items()}
    runs["torch_sdpa"] = torch_form(shape, q, k, v, rh, rw)
    with torch.inference_mode():
        ref = runs["torch_sdpa"]().numpy()
        err = {f: float(np.max(np.abs(np.asarray(runs[f]()) - ref))) for f in compiled}
        times = {f: [] for f in runs}
        for r in range(rounds):
            order = list(runs.items()) if r % 2 else list(runs.items())[::-1]
            for f, fn in order:
                t0 = time.perf_counter()
                fn()
                times[f].append(time.perf_counter() - t0)
    med = {f: statistics.median(x) * 1e3 / CHAIN for f, x in times.items()}
    return {"shape": {"batch": b, "tokens": gh * gw, "heads": n, "head_dim": h, "rel_pos_bias": shape[4]},
            "now_block": block, "median_ms_per_call": {f: round(x, 2) for f, x in med.items()},
            "torch_over_form": {f: round(med["torch_sdpa"] / x, 3) for f, x in med.items()},
            "max_abs_difference_from_torch": err}


def towers(rounds: int) -> dict:
    """Whole towers, one image: ours (attention in use / the stop-32 form) and transformers', interleaved."""
    import torchvision_ops

    torchvision_ops.ensure_importable()
    from transformers import SamVisionConfig, SamVisionModel, SiglipVisionConfig, SiglipVisionModel

    from deepseek_vl_jax import siglip
    from deepseek_vl_jax.config import SamConfig, SiglipConfig

    sig = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384,
               patch_size=16, vision_use_head=False)
    cases = {"siglip": (siglip.SiglipVisionModel(SiglipConfig(**sig)), {},
                        SiglipVisionModel(SiglipVisionConfig(**sig, attn_implementation="sdpa")), 384),
             "sam_vit_b": (sam.SamVisionEncoder(SamConfig()), {"keep_hidden": (3,)},
                           SamVisionModel(SamVisionConfig(attn_implementation="sdpa")), 1024)}
    out = {}
    for name, (module, kw, hf, size) in cases.items():
        pix = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        params = jax.jit(lambda x: module.init(jax.random.key(0), x, **kw))(pix)["params"]

        def compiled(attend):
            def run(p, x):
                saved, layers.attention = layers.attention, attend
                try:
                    return module.apply({"params": p}, x, **kw)
                finally:
                    layers.attention = saved
            return jax.jit(run).lower(params, pix).compile()

        stop32 = lambda q, k, v, bias=None, scale=None, mask=None: stop32_attention(q, k, v, bias, scale)
        forms = {"now": compiled(layers.attention), "stop32": compiled(stop32)}
        runs = {f: (lambda c=c: jax.block_until_ready(c(params, pix))) for f, c in forms.items()}
        tp = torch.from_numpy(pix)
        runs["transformers"] = lambda: hf.eval()(pixel_values=tp)
        times = {f: [] for f in runs}
        with torch.inference_mode():
            for f in runs.values():
                f()
            for r in range(rounds):
                for f, fn in (list(runs.items()) if r % 2 else list(runs.items())[::-1]):
                    t0 = time.perf_counter()
                    fn()
                    times[f].append(time.perf_counter() - t0)
        med = {f: statistics.median(x) * 1e3 for f, x in times.items()}
        out[name] = {"median_ms": {f: round(x, 1) for f, x in med.items()},
                     "transformers_over_form": {f: round(med["transformers"] / x, 3) for f, x in med.items()}}
        print(name, json.dumps(out[name]["median_ms"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--blocks", default="32,64,128,256", help="other query blocks to time, comma-separated")
    p.add_argument("--towers", action="store_true", help="time the whole towers (see above)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "encoder_attention.json"))
    args = p.parse_args()
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    info = machine()
    entry = {"machine": info, "torch_threads": torch.get_num_threads(), "uptime_at_start": uptime(),
             "rounds": args.rounds, "calls_per_sample": CHAIN}
    if args.towers:
        entry["towers"] = towers(args.rounds)
    else:
        for name in args.shapes.split(","):
            entry[name] = measure(name, args.rounds, [int(x) for x in args.blocks.split(",") if x])
            print(name, json.dumps(entry[name]["median_ms_per_call"]), flush=True)
    entry["uptime_at_end"] = uptime()
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"keyed_by": "generate_profile.machine_key"}
    part = "towers" if args.towers else "attention"
    results.setdefault("machines", {}).setdefault(machine_key(info), {})[part] = entry
    with open(args.out, "w") as f:
        f.write(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

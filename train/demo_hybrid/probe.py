"""Where does the stripes signal get lost? Linear read-outs (ridge, picture-level) of "striped vs plain" at each step
of the tiny hybrid's image path, and the size of the two aligner halves' contributions to what LLaMA reads.

    python train/demo_hybrid/probe.py MODEL_DIR DATA.jsonl [--rows 300] [--scale K]

DATA: stripes rows (each with a "striped" list). Prints one JSON line: for each stage (the high-resolution features,
the aligner's SAM half and SigLIP half as they enter LLaMA, and their sum, the image embeddings), the held-out
accuracy of a ridge read-out fitted on the first 3/4 of the pictures, and the RMS of each half's contribution.
`--scale K` reads the embeddings with the SAM half's contribution multiplied by K (what a larger SAM half would
give LLaMA)."""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

A = "aligner"


def ridge_accuracy(x: np.ndarray, y: np.ndarray, split: float = 0.75) -> float:
    """Held-out accuracy of a ridge classifier (labels +-1), its strength picked by leave-one-out on the fit set."""
    n = int(len(y) * split)
    x = x.reshape(len(x), -1).astype(np.float64)
    mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-8
    x = (x - mu) / sd
    t = 2.0 * y - 1.0
    u, s, vt = np.linalg.svd(x[:n], full_matrices=False)
    best = None
    for lam in 10.0 ** np.arange(-2, 5):
        h = (u * (s**2 / (s**2 + lam))) @ u.T  # hat matrix
        loo = (t[:n] - h @ t[:n]) / (1 - np.diag(h) + 1e-12)
        err = np.mean(np.sign(t[:n] - loo) != t[:n])
        if best is None or err < best[0]:
            best = (err, lam)
    lam = best[1]
    w = vt.T @ ((s / (s**2 + lam)) * (u.T @ t[:n]))
    return float(np.mean(np.sign(x[n:] @ w) == t[n:]))


def stages(model, pixel_values, high_res) -> dict:
    """Per picture: high-res features [N, P, C], the SAM and SigLIP halves' contributions to the embeddings
    [N, P, D] each, and the proj bias [D]."""
    m, p = model.module, model.params

    def f(params, px, hr):
        def inner(mod):
            low, _ = mod.vision_model(px)
            return low, mod.high_res_features(hr)
        low, high = m.apply({"params": params}, method=inner)
        al = params[A]
        gelu = lambda v: jax.nn.gelu(v, approximate=False)
        a_high = gelu(high @ al["high_res_vision_proj"]["kernel"] + al["high_res_vision_proj"]["bias"])
        a_low = gelu(low @ al["vision_proj"]["kernel"] + al["vision_proj"]["bias"])
        wp = al["proj"]["kernel"]
        half = a_high.shape[-1]
        return high, a_high @ wp[:half], a_low @ wp[half:], al["proj"]["bias"]

    return jax.jit(f)(p, jnp.asarray(pixel_values), jnp.asarray(high_res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    import deepseek_vl_jax as D

    model = D.load_pretrained(args.model, progress=False)
    proc = D.load_processor(args.model)
    rows = [json.loads(line) for line in open(args.data)][: args.rows]
    base = os.path.dirname(os.path.abspath(args.data))
    y = np.array([r["striped"][0] for r in rows], np.float64)
    outs = []
    for i in range(0, len(rows), 50):
        imgs = [Image.open(os.path.join(base, r["messages"][0]["content"][0]["image"])).convert("RGB")
                for r in rows[i:i + 50]]
        chats = [[{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "?"}]}]
                 for im in imgs]
        enc = proc(chats, images=[[im] for im in imgs])
        outs.append([np.asarray(a) for a in stages(model, enc["pixel_values"], enc["high_res_pixel_values"])[:3]])
    high, c_high, c_low = (np.concatenate([o[k] for o in outs]) for k in range(3))
    rms = lambda v: float(np.sqrt(np.mean(v**2)))
    emb = args.scale * c_high + c_low
    out = {
        "model": args.model, "pictures": len(rows), "scale": args.scale,
        "readout": {"high_res_features": ridge_accuracy(high, y), "sam_half": ridge_accuracy(c_high, y),
                    "siglip_half": ridge_accuracy(c_low, y), "embeddings": ridge_accuracy(emb, y),
                    "embeddings_mean_over_tokens": ridge_accuracy(emb.mean(1), y)},
        "rms": {"sam_half": rms(c_high), "siglip_half": rms(c_low),
                "sam_half_striped_minus_plain": rms(c_high[y == 1].mean(0) - c_high[y == 0].mean(0)),
                "siglip_half_across_pictures": rms(c_low - c_low.mean(0))},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

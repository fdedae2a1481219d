"""Where a demo model keeps WHERE things are: ridge probes, per image token, through SigLIP, the aligner and LLaMA.

For "Is the blue triangle on the left or the right?" LLaMA must find the image token holding the blue triangle and
copy its side; RoPE only rotates queries and keys, so the side must be in that token's own values. For each stage
of the image path (patch embedding alone, SigLIP's residual stream after each layer, its post-layernorm output, the
aligner output, LLaMA's hidden states at the image tokens) three linear read-outs, fitted on 3/4, scored on the rest:
- token_column_half: every image token -> is its column in the left or the right half of the grid;
- centre_token_side: the token under each shape's centre -> the shape's side;
- box_avg_side: the tokens under each shape's box, averaged (error_analysis.py's probe) -> the shape's side;
and the RMS of each stage and of the position-embedding table. Read with transformers (an independent reader). And,
with the model's own processor, whether any shape's ink reaches the other half of the picture the model sees (the
centre line is a patch boundary at 64 px / 16-px patches, so a side is visible only if no ink crosses it).

    python train/demo/position_probe.py MODEL OUT.json [--pictures 800]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import torchvision_ops  # noqa: E402  (transformers imports torchvision; see tests/torchvision_ops.py)

torchvision_ops.ensure_importable()

import torch  # noqa: E402
from transformers import AutoProcessor, DeepseekVLForConditionalGeneration  # noqa: E402

import deepseek_vl_jax as D  # noqa: E402
from deepseek_vl_jax.synthetic.scenes import Scene  # noqa: E402
from deepseek_vl_jax.synthetic.styles import FAMILIES, draw_styled, styled_scene  # noqa: E402

SEED = 99  # error_analysis.py's PROBE_SEED: the same pictures
QUESTION = "Is the red circle on the left or the right?"


def ridge(x: np.ndarray, y: np.ndarray, k: int) -> float:
    x = np.c_[x, np.ones(len(x))]
    cut = 3 * len(x) // 4
    w = np.linalg.solve(x[:cut].T @ x[:cut] + 1e-2 * np.eye(x.shape[1]), x[:cut].T @ np.eye(k)[y][:cut])
    return round(float(((x[cut:] @ w).argmax(1) == y[cut:]).mean()), 3)


def states(model, processor, scenes) -> dict[str, np.ndarray]:
    """name -> [pictures, image tokens, width] for each stage of the image path."""
    vision, out = model.model.vision_model, {}
    with torch.no_grad():
        for start in range(0, len(scenes), 100):
            part = scenes[start:start + 100]
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = processor.apply_chat_template(chat, add_generation_prompt=True)
            batch = processor(text=[text] * len(part), images=[draw_styled(*s) for s in part], return_tensors="pt",
                              padding=True)
            px = batch["pixel_values"]
            got = {"patch_embedding": vision.embeddings.patch_embedding(px).flatten(2).transpose(1, 2)}
            vo = vision(px, output_hidden_states=True)
            got.update({f"siglip_residual_{i}": h for i, h in enumerate(vo.hidden_states)})
            got["siglip_output"] = vo.last_hidden_state
            got["aligned"] = model.model.aligner(vo.last_hidden_state)
            lm = model.model(**batch, output_hidden_states=True)
            image = batch["input_ids"] == model.config.image_token_id
            got.update({f"llama_hidden_{i}": h[image].reshape(len(part), -1, h.shape[-1])
                        for i, h in enumerate(lm.hidden_states)})
            for k, v in got.items():
                out.setdefault(k, []).append(v.float().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def ink_across_centre(model_dir: str, scenes) -> dict:
    """Per family: shapes whose ink (|pixel - background| > 0.05 of the [-1, 1] range, each shape drawn alone on its
    picture's background) reaches the other half of the processed picture, and the columns between ink and line."""
    processor = D.load_processor(model_dir)

    def pixels(img):
        chat = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]}]
        return np.asarray(processor([chat])["pixel_values"], np.float32)[0]

    out = {}
    for family in FAMILIES:
        crossing, gaps = 0, []
        for scene, style in [s for i, s in enumerate(scenes) if FAMILIES[i % len(FAMILIES)] == family]:
            background = pixels(draw_styled(Scene(()), style))
            for s in scene.shapes:
                ink = np.abs(pixels(draw_styled(Scene((s,)), style)) - background).max(0) > 0.05  # [H, W]
                mid = ink.shape[1] // 2
                cols = np.nonzero(ink.any(0))[0]
                crossing += int(ink[:, mid:].any() if s.side == "left" else ink[:, :mid].any())
                gaps.append(int(mid - 1 - cols.max() if s.side == "left" else cols.min() - mid))
        out[family] = {"shapes": len(gaps), "ink_across_centre_line": crossing, "min_gap_px": min(gaps),
                       "median_gap_px": int(np.median(gaps))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--pictures", type=int, default=800)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = DeepseekVLForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model, backend="pil")
    rng = np.random.default_rng(SEED)
    scenes = [styled_scene(rng, FAMILIES[i % len(FAMILIES)]) for i in range(args.pictures)]
    table = model.model.vision_model.embeddings.position_embedding.weight.detach().numpy()
    result = {"model": args.model, "pictures": args.pictures, "seed": SEED,
              "position_embedding_rms": round(float(np.sqrt((table ** 2).mean())), 4), "stages": {}}
    for name, f in states(model, processor, scenes).items():
        g = int(round(f.shape[1] ** 0.5))
        centres = (np.arange(g) + 0.5) / g
        half = np.tile((np.arange(g) >= g // 2).astype(int), g)  # row-major tokens: column = index % g
        at_centre, in_box, side = [], [], []
        for (scene, _), feats in zip(scenes, f):
            for s in scene.shapes:
                at_centre.append(feats[min(int(s.y * g), g - 1) * g + min(int(s.x * g), g - 1)])
                r = max(s.radius, 0.5 / g)
                w = np.outer(abs(centres - s.y) <= r, abs(centres - s.x) <= r).reshape(-1).astype(float)
                in_box.append(feats.T @ w / w.sum())
                side.append(int(s.side == "right"))
        side = np.asarray(side)
        result["stages"][name] = {
            "token_column_half": ridge(f.reshape(-1, f.shape[-1]), np.tile(half, len(f)), 2),
            "centre_token_side": ridge(np.asarray(at_centre), side, 2),
            "box_avg_side": ridge(np.asarray(in_box), side, 2),
            "rms": round(float(np.sqrt((f ** 2).mean())), 3)}
        print(name, result["stages"][name], flush=True)
    result["ink_across_centre_line"] = ink_across_centre(args.model, scenes)
    print(result["ink_across_centre_line"])
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

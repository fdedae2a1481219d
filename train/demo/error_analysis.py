"""Where a demo model misses: fresh side, colour and shape questions (every family, the never-trained one included)
tallied by the number of shapes in the picture, the asked shape's size and its distance from the centre line; and
the same model on the first turns of its own training chats (is it the data or the model: does it fit what it was
trained on?); and a ridge probe on the image features at each shape's patches (aligned, as the language model
receives them; SigLIP's output; and, as the control, its position embeddings alone): can a linear read-out tell
the shape's colour, kind, size and side?

    python train/demo/error_analysis.py MODEL OUT.json [--work runs/demo] [--rows 480]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np

import deepseek_vl_jax as D
from deepseek_vl_jax.synthetic.dataset import chat
from deepseek_vl_jax.synthetic.questions import _by_object
from deepseek_vl_jax.synthetic.scenes import COLORS, SHAPES
from deepseek_vl_jax.synthetic.styles import FAMILIES, draw_styled, styled_scene
from deepseek_vl_jax.training import data
from deepseek_vl_jax.training.config import BadRows
from deepseek_vl_jax.training.evaluate import by_kind, exact_match

KINDS = ("side", "color", "shape")
SEED = 777  # no split of the recipe draws from it (nor does PROBE_SEED)
PROBE_SEED = 99


def fresh_rows(directory: str, count: int) -> tuple[str, list[dict]]:
    """`count` single questions, family and kind in turn, and what each asks about."""
    rng = np.random.default_rng(SEED)
    rows, meta = [], []
    for i in range(count):
        family, kind = FAMILIES[i % len(FAMILIES)], KINDS[(i // len(FAMILIES)) % len(KINDS)]
        while True:
            scene, style = styled_scene(rng, family)
            asked = [c for c in _by_object(scene) if c[1] == kind]
            if asked:
                break
        subject, _, question, answer = asked[int(rng.integers(len(asked)))]
        shape = scene.shapes[subject]
        rel = f"images/{i:05d}.png"
        os.makedirs(os.path.join(directory, "images"), exist_ok=True)
        draw_styled(scene, style).save(os.path.join(directory, rel))
        rows.append({"messages": chat(rel, question, answer), "kind": kind})
        meta.append({"family": family, "kind": kind, "shapes": len(scene.shapes), "size": shape.size,
                     "gap": round(min(abs(shape.x - 0.5) - shape.radius, 0.25), 2) // 0.05 * 0.05})
    path = os.path.join(directory, "fresh.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path, meta


def tally(meta: list[dict], key) -> dict[str, list[int]]:
    out = collections.defaultdict(lambda: [0, 0])
    for m in meta:
        out[key(m)][0] += m["correct"]
        out[key(m)][1] += 1
    return dict(sorted(out.items()))


def first_turns(work: str, count: int) -> str:
    """The first question of each of the first `count` styled training chats, as single-question rows."""
    path = os.path.join(work, "styled", "error_analysis_train_first_turns.jsonl")
    with open(os.path.join(work, "styled", "train.jsonl")) as f, open(path, "w") as out:
        for _, line in zip(range(count), f):
            row = json.loads(line)
            out.write(json.dumps({"messages": row["messages"][:2], "kind": row["kinds"][0]}) + "\n")
    return path


def feature_probe(model, processor, source: str, pictures: int = 1600) -> dict:
    """Ridge read-outs of each shape's colour, kind, size and side from image features [P, D] averaged over the
    patches whose centres lie within the shape's box; fitted on 3/4 of the shapes, accuracy on the rest. source:
    "aligned" (what replaces the image tokens), "siglip" (SigLIP's last hidden state) or "positions" (SigLIP's
    position embeddings alone: the control, which must tell the side and nothing else)."""
    rng = np.random.default_rng(PROBE_SEED)
    scenes = [styled_scene(rng, FAMILIES[i % len(FAMILIES)]) for i in range(pictures)]
    feats = []
    for start in range(0, pictures, 100):
        chats = [[{"role": "user", "content": [{"type": "image", "image": draw_styled(*s)},
                                               {"type": "text", "text": "?"}]}] for s in scenes[start:start + 100]]
        batch = processor(chats, add_generation_prompt=True, padding_side="left")
        px = np.asarray(batch["pixel_values"], np.float32)
        if source == "aligned":
            feats.append(np.asarray(model.get_image_features(px)))
        elif source == "siglip":
            feats.append(np.asarray(model.module.apply({"params": model.params}, px,
                                                       method=lambda m, x: m.vision_model(x)[0])))
        else:
            pos = np.asarray(model.params["vision_model"]["position_embedding"])
            feats.append(np.broadcast_to(pos, (len(px), *pos.shape)))
    feats = np.concatenate(feats)
    g = int(round(feats.shape[1] ** 0.5))
    centres = (np.arange(g) + 0.5) / g
    x, labels = [], []
    for (scene, _), f in zip(scenes, feats):
        for s in scene.shapes:
            half = max(s.radius, 0.5 / g)
            w = np.outer(abs(centres - s.y) <= half, abs(centres - s.x) <= half).reshape(-1).astype(float)
            x.append(f.T @ w / w.sum())
            labels.append((list(COLORS).index(s.color), SHAPES.index(s.kind), int(s.size == "big"),
                           int(s.side == "right"), len(scene.shapes)))
    x, labels = np.c_[np.asarray(x), np.ones(len(x))], np.asarray(labels)
    cut = 3 * len(x) // 4
    out = {"shapes": len(x), "tested": len(x) - cut}
    for j, (name, k) in enumerate((("color", 6), ("shape", 3), ("size", 2), ("side", 2))):
        target = np.eye(k)[labels[:, j]]
        w = np.linalg.solve(x[:cut].T @ x[:cut] + 1e-2 * np.eye(x.shape[1]), x[:cut].T @ target[:cut])
        right = (x[cut:] @ w).argmax(1) == labels[cut:, j]
        out[name] = {"all": round(float(right.mean()), 3),
                     **{f"{n} shape(s)": round(float(right[labels[cut:, 4] == n].mean()), 3) for n in (1, 2, 3)}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--work", default="runs/demo")
    p.add_argument("--rows", type=int, default=480)
    args = p.parse_args()
    model, processor = D.load_pretrained(args.model, progress=False), D.load_processor(args.model)

    def evaluate(path):
        rows = data.read_rows(path, 1, BadRows.FAIL).rows
        accuracy, records = exact_match(model, processor, rows, max_new_tokens=6, batch_size=60)
        return accuracy, records, by_kind(path, records)

    with tempfile.TemporaryDirectory() as d:
        path, meta = fresh_rows(d, args.rows)
        accuracy, records, _ = evaluate(path)
    for m, r in zip(meta, records):
        m["correct"] = int(r["correct"])
    train_path = first_turns(args.work, 300)
    train_accuracy, _, train_kinds = evaluate(train_path)
    result = {
        "model": args.model, "rows": len(meta), "exact_match": accuracy, "seed": SEED,
        "by_kind_and_shapes": tally(meta, lambda m: f"{m['kind']}, {m['shapes']} shape(s)"),
        "by_kind_and_family": tally(meta, lambda m: f"{m['kind']}, {m['family']}"),
        "side_by_size": tally([m for m in meta if m["kind"] == "side"], lambda m: m["size"]),
        "side_by_gap_to_centre_line": tally([m for m in meta if m["kind"] == "side"], lambda m: f"{m['gap']:.2f}"),
        "training_chats_first_turn": {"exact_match": train_accuracy, "rows": 300, "by_kind": train_kinds},
        "ridge_probe_of_image_features": {source: feature_probe(model, processor, source)
                                          for source in ("aligned", "siglip", "positions")},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("exact_match", "by_kind_and_shapes", "training_chats_first_turn",
                                                "ridge_probe_of_image_features")}))


if __name__ == "__main__":
    main()

"""The hybrid's fine-detail scenes (synthetic/stripes.py): every stripes answer is true of its picture, the stripes
keep each shape's mean colour (so ordinary answers stay true), rows are deterministic from the seed, and the stripes
show at the SAM tower's input while SigLIP's averages them away."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from deepseek_vl_jax.synthetic.stripes import (CANVAS, QUESTION, STRIPES, draw_striped, shape_mask, striped_scene,
                                               write_stripe_split)
from deepseek_vl_jax.synthetic.styles import draw_styled
from deepseek_vl_jax.synthetic.tokenizer import write_processor

FAMILIES = ("solid", "noise")


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _pairs(messages):
    texts = [next(i["text"] for i in m["content"] if i["type"] == "text") for m in messages]
    return list(zip(texts[::2], texts[1::2]))


def _row_energy(img, mask):
    """Mean |difference between vertically adjacent pixels| inside `mask` (the stripes' signature)."""
    a = np.asarray(img, np.float32)
    d = np.abs(a[1:] - a[:-1]).max(-1)
    m = mask[1:] & mask[:-1]
    return float(d[m].mean())


def test_every_stripes_answer_is_true_of_its_picture(tmp_path):
    """Each answer matches what is drawn: a striped shape's inside alternates row by row, a plain one's does not.
    Every chat asks about the stripes once, and no question twice."""
    rows = _rows(write_stripe_split(str(tmp_path), "train", 30, seed=5, families=FAMILIES, turns=4))
    rng = np.random.default_rng(5)
    for row in rows:
        assert STRIPES in row["kinds"] and len(row["kinds"]) == len(_pairs(row["messages"]))
        questions = [q for q, _ in _pairs(row["messages"])]
        assert len(set(questions)) == len(questions)
        assert len(set(row["striped"])) == 1  # all shapes of a picture striped, or all plain
        assert dict(_pairs(row["messages"]))[QUESTION] == ("striped" if row["striped"][0] else "plain")
        img = Image.open(os.path.join(tmp_path, row["messages"][0]["content"][0]["image"])).convert("RGB")
        assert img.size == (CANVAS, CANVAS)
    # the answers against the pixels, on scenes drawn the writer's way
    for i in range(30):
        scene, style, striped = striped_scene(rng, FAMILIES[i % 2])
        img = draw_striped(scene, style, striped)
        for shape, on in zip(scene.shapes, striped):
            energy = _row_energy(img, shape_mask(shape, CANVAS))
            assert (energy > 20) if on else (energy < 6), (shape, on, energy)


def test_stripes_keep_each_shapes_mean_colour():
    rng = np.random.default_rng(3)
    for i in range(20):
        scene, style, _ = striped_scene(rng, FAMILIES[i % 2])
        on = tuple(True for _ in scene.shapes)
        a = np.asarray(draw_striped(scene, style, on), np.float32)
        b = np.asarray(draw_styled(scene, style), np.float32)
        for shape in scene.shapes:
            m = shape_mask(shape, CANVAS)
            rows = np.nonzero(m.any(1))[0]
            even = rows[(rows - rows[0]) % 2 == 0][:-1] if len(rows) % 2 else rows[::2]
            pairs = np.zeros_like(m)
            pairs[even] = m[even] & m[even + 1]
            pairs[even + 1] = pairs[even]
            assert np.abs(a[pairs].mean(0) - b[pairs].mean(0)).max() < 1.0
        assert np.array_equal(a[~np.any([shape_mask(s, CANVAS) for s in scene.shapes], 0)],
                              b[~np.any([shape_mask(s, CANVAS) for s in scene.shapes], 0)])


def test_rows_and_pictures_are_deterministic_from_the_seed(tmp_path):
    paths = [write_stripe_split(str(tmp_path / n), "heldout", 12, seed=9, families=FAMILIES) for n in ("a", "b")]
    assert open(paths[0]).read() == open(paths[1]).read()
    for name in sorted(os.listdir(tmp_path / "a" / "images" / "heldout")):
        assert ((tmp_path / "a" / "images" / "heldout" / name).read_bytes()
                == (tmp_path / "b" / "images" / "heldout" / name).read_bytes())
    only = _rows(write_stripe_split(str(tmp_path / "c"), "s", 8, seed=9, families=FAMILIES, kind=STRIPES))
    assert all(r["kind"] == STRIPES and _pairs(r["messages"])[0][1] in ("striped", "plain") for r in only)


def test_grid_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="free-layout"):
        write_stripe_split(str(tmp_path), "x", 1, 0, families=("grid",))


def test_the_sam_input_shows_the_stripes_and_siglips_does_not(tmp_path):
    """Through the hybrid processor (SigLIP 64 px, SAM 128 px), a striped picture minus the same picture plain:
    SAM's input differs by up to CONTRAST / 255 = 0.19 in every picture, SigLIP's by much less and on average ~19x
    less (measured over 20 pictures: largest difference SAM >= 0.149, SigLIP <= 0.063; mean SAM 0.0085, SigLIP
    0.00045)."""
    import deepseek_vl_jax as D

    write_processor(str(tmp_path), ["striped or plain"] * 10, 64, 16, vocab_size=300, high_res_size=128)
    proc = D.load_processor(str(tmp_path))
    cfg = proc.image_processor.config
    rng = np.random.default_rng(11)
    stats = {"high_res_pixel_values": [], "pixel_values": []}
    for i in range(20):
        scene, style, _ = striped_scene(rng, FAMILIES[i % 2])
        on = tuple(True for _ in scene.shapes)
        ins = [proc([[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "?"}]}]])
               for img in (draw_striped(scene, style, on), draw_styled(scene, style))]
        for key, values in stats.items():
            std = np.asarray(cfg.high_res_image_std if key.startswith("high") else cfg.image_std)[:, None, None]
            diff = np.abs(np.asarray(ins[0][key])[0] - np.asarray(ins[1][key])[0]) * std
            values.append((diff.max(), diff.mean()))
    sam, siglip = (np.asarray(stats[k]) for k in stats)
    assert sam[:, 0].min() > 0.12 and siglip[:, 0].max() < 0.08, (sam[:, 0], siglip[:, 0])
    assert sam[:, 1].mean() > 12 * siglip[:, 1].mean(), (sam[:, 1].mean(), siglip[:, 1].mean())

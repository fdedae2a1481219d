"""Fine-detail scenes for the hybrid model: shapes filled plain or with fine stripes, and "Are the shapes striped or
plain?".

A striped shape's rows alternate between its colour lightened and darkened by the same amount, one pixel each, on a
128-px canvas: the SAM tower's 128-px input shows the stripes pixel for pixel, while SigLIP's 64-px input (a 2x
bicubic reduction) averages each pair of rows back to the plain colour, so a striped and a plain shape look alike
there. Every ordinary question (`questions.py`) stays true: a shape's mean colour, kind, size and side are unchanged.

    write_stripe_split(directory, name, count, seed, families=("solid", "noise"), turns=4)

writes chats of up to `turns` questions, one of them about the stripes (`kind=STRIPES` instead: every row
asks only that).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from deepseek_vl_jax.synthetic.dataset import chat, conversation
from deepseek_vl_jax.synthetic.questions import _by_object as by_object
from deepseek_vl_jax.synthetic.scenes import Scene
from deepseek_vl_jax.synthetic.styles import FAMILIES, Style, draw_styled, styled_scene

STRIPES = "stripes"  # the question kind
CANVAS = 128  # the SAM tower's input size: one stripe is one of its pixels
CONTRAST = 48  # the largest change per channel (within 0..255, so that each pair of rows averages to the fill)


QUESTION = "Are the shapes striped or plain?"


def striped_scene(rng: np.random.Generator, family: str) -> tuple[Scene, Style, tuple[bool, ...]]:
    """A scene in `family` on a CANVAS-px canvas, and for each shape whether it is striped: all shapes of a picture
    are striped, or all plain (one fair coin), so the answer is the picture's, not one shape's."""
    scene, style = styled_scene(rng, family)
    return scene, dataclasses.replace(style, canvas=CANVAS), (bool(rng.integers(2)),) * len(scene.shapes)


def shape_mask(shape, size: int) -> np.ndarray:
    """[size, size] bool: the pixels well inside the shape (its outline drawn 2 px thinner, so no edge pixel)."""
    m = Image.new("L", (size, size), 0)
    r, cx, cy = shape.radius * size - 2.5, shape.x * size, shape.y * size
    pen = ImageDraw.Draw(m)
    if shape.kind == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape.kind == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        pen.polygon([(cx, cy - r + 3), (cx - r + 2, cy + r), (cx + r - 2, cy + r)], fill=1)
    return np.asarray(m, bool)


def draw_striped(scene: Scene, style: Style, striped: tuple[bool, ...]) -> Image.Image:
    """The scene in `style`, each striped shape's inside modulated row by row: +d on even rows, -d on odd rows, with
    d = min(value, 255 - value, CONTRAST) per pixel and channel (so every pair of rows keeps its mean)."""
    img = np.asarray(draw_styled(scene, style)).astype(np.int16)
    size = img.shape[0]
    sign = np.where(np.arange(size) % 2 == 0, 1, -1)[:, None, None]
    for shape, on in zip(scene.shapes, striped):
        if on:
            d = np.minimum(np.minimum(img, 255 - img), CONTRAST)
            mask = shape_mask(shape, size)[..., None]
            img = np.where(mask, img + sign * d, img)
    return Image.fromarray(img.astype(np.uint8))


def stripe_questions(scene: Scene, striped: tuple[bool, ...]) -> list[tuple[int, str, str, str]]:
    """[(object, STRIPES, question, answer)]: the one stripes question, about the whole picture (object -2)."""
    return [(-2, STRIPES, QUESTION, "striped" if striped[0] else "plain")]


def striped_rows(scene: Scene, striped: tuple[bool, ...], rng: np.random.Generator, image: str, turns: int,
                 kind: str | None) -> list[dict]:
    """kind=STRIPES: the stripes question; turns > 1: a chat of up to `turns` questions in random order, the stripes
    question and the rest drawn as `questions.ask_turns` draws them (each shape the subject of at most one);
    otherwise one question, its kind drawn uniformly among the scene's kinds (the stripes among them)."""
    stripes = stripe_questions(scene, striped)
    left = by_object(scene) + stripes
    if kind is not None:
        options = [c for c in left if c[1] == kind]
        _, k, q, a = options[int(rng.integers(len(options)))]
        return [{"messages": chat(image, q, a), "kind": k}]
    asked = []
    if turns > 1:
        first = stripes[int(rng.integers(len(stripes)))]
        asked.append(first)
        left = [c for c in left if c[0] != first[0]]
    while left and len(asked) < max(turns, 1):
        kinds = sorted({c[1] for c in left})
        k = kinds[int(rng.integers(len(kinds)))]
        options = [c for c in left if c[1] == k]
        pick = options[int(rng.integers(len(options)))]
        asked.append(pick)
        left = [c for c in left if c[0] != pick[0]]
    order = [asked[i] for i in rng.permutation(len(asked))]
    if turns > 1:
        return [{"messages": conversation(image, [(q, a) for _, _, q, a in order]),
                 "kinds": [k for _, k, _, _ in order]}]
    _, k, q, a = order[0]
    return [{"messages": chat(image, q, a), "kind": k}]


def write_stripe_split(directory: str, name: str, count: int, seed: int,
                       families: tuple[str, ...] = ("solid", "noise"), turns: int = 1, kind: str | None = None) -> str:
    """`count` pictures into `directory/images/name/`, their rows into `directory/name.jsonl` (each labelled with its
    question kind(s), style and which shapes are striped). Returns the JSONL path."""
    for family in families:
        if family not in FAMILIES or family == "grid":
            raise ValueError(f"striped scenes need a free-layout style family, got {family!r}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images", name), exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            family = families[int(rng.integers(len(families)))]
            scene, style, striped = striped_scene(rng, family)
            rel = f"images/{name}/{i:06d}.png"
            draw_striped(scene, style, striped).save(os.path.join(directory, rel))
            for record in striped_rows(scene, striped, rng, rel, turns, kind):
                record["style"], record["striped"] = style.as_record(), list(striped)
                f.write(json.dumps(record) + "\n")
    return path

"""Fine-detail scenes for the hybrid model: one small coloured dot on the background, and "What color is the dot?".

The dot is about 3 px across at the SAM tower's 128-px input (a ninth of one 8-px SAM patch) and about 1.5 px at
SigLIP's 64 px (under 1% of one 16-px SigLIP patch, faded by the bicubic resize). Every ordinary question
(`questions.py`) stays true of a dotted scene: the dot is far smaller than any shape and clear of them all.

    write_dot_split(directory, name, count, seed, families=("solid", "noise"), turns=4)

writes chats of up to `turns` questions, one of them about the dot (`kind=DOT` instead: every row asks only it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from deepseek_vl_jax.synthetic.dataset import chat, conversation
from deepseek_vl_jax.synthetic.questions import _candidates as candidates
from deepseek_vl_jax.synthetic.questions import ask, ask_turns
from deepseek_vl_jax.synthetic.scenes import COLORS, Scene
from deepseek_vl_jax.synthetic.styles import FAMILIES, SUPERSAMPLE, Style, draw_styled, styled_scene

DOT = "dot"  # the question kind
DOT_QUESTION = "What color is the dot?"
DOT_RADIUS = 0.012  # radius, as a fraction of the canvas: 3 px across at SAM's 128 px, 1.5 px at SigLIP's 64 px
DOT_MARGIN = 0.05  # the dot keeps this far (fraction of the canvas) from the border and from every shape


@dataclasses.dataclass(frozen=True)
class Dot:
    x: float  # centre, as fractions of the canvas
    y: float
    color: str  # a palette name


def random_dot(scene: Scene, rng: np.random.Generator) -> Dot:
    """A dot of a random palette colour on the background: inside the canvas and clear of every shape (farther
    from each shape's centre than its circumscribed circle, plus a margin)."""
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    while True:
        x, y = (float(v) for v in rng.uniform(DOT_MARGIN, 1 - DOT_MARGIN, size=2))
        if all(np.hypot(x - s.x, y - s.y) > 1.45 * s.radius + DOT_MARGIN for s in scene.shapes):
            return Dot(x, y, color)


def draw_dotted(scene: Scene, style: Style, dot: Dot) -> Image.Image:
    """The scene in `style` with the dot on top (anti-aliased like the style's shapes)."""
    img = draw_styled(scene, style)
    scale = SUPERSAMPLE if style.antialias else 1
    size = style.canvas * scale
    big = img.resize((size, size), Image.NEAREST) if scale > 1 else img
    x, y = dot.x, dot.y
    r = max(DOT_RADIUS * size, 0.75 * scale)
    ImageDraw.Draw(big).ellipse([x * size - r, y * size - r, x * size + r, y * size + r], fill=COLORS[dot.color])
    return big.resize((style.canvas, style.canvas), Image.BOX) if scale > 1 else big


def dotted_rows(scene: Scene, dot: Dot, rng: np.random.Generator, image: str, turns: int,
                kind: str | None) -> list[dict]:
    """The rows about one dotted picture: kind=DOT one dot question; turns > 1 a chat of up to `turns - 1` ordinary
    questions (`questions.ask_turns`) with the dot question at a random turn; otherwise one question, its kind drawn
    uniformly among the scene's ordinary kinds and the dot."""
    if kind == DOT:
        return [{"messages": chat(image, DOT_QUESTION, dot.color), "kind": DOT}]
    if kind is not None:
        k, q, a = ask(scene, rng, kind)
        return [{"messages": chat(image, q, a), "kind": k}]
    if turns > 1:
        asked = list(ask_turns(scene, rng, turns - 1))
        asked.insert(int(rng.integers(len(asked) + 1)), (DOT, DOT_QUESTION, dot.color))
        return [{"messages": conversation(image, [(q, a) for _, q, a in asked]), "kinds": [k for k, _, _ in asked]}]
    kinds = sorted({k for k, _, _ in candidates(scene)} | {DOT})
    pick = kinds[int(rng.integers(len(kinds)))]
    return dotted_rows(scene, dot, rng, image, 1, pick)


def write_dot_split(directory: str, name: str, count: int, seed: int, families: tuple[str, ...] = ("solid", "noise"),
                    turns: int = 1, kind: str | None = None) -> str:
    """`count` dotted pictures into `directory/images/name/`, their rows into `directory/name.jsonl` (each row
    labelled with its question kind(s), style and dot). Returns the JSONL path."""
    for family in families:
        if family not in FAMILIES or family == "grid":
            raise ValueError(f"dotted scenes need a free-layout style family, got {family!r}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images", name), exist_ok=True)
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w") as f:
        for i in range(count):
            family = families[int(rng.integers(len(families)))]
            scene, style = styled_scene(rng, family)
            dot = random_dot(scene, rng)
            rel = f"images/{name}/{i:06d}.png"
            draw_dotted(scene, style, dot).save(os.path.join(directory, rel))
            for record in dotted_rows(scene, dot, rng, rel, turns, kind):
                record["style"], record["dot"] = style.as_record(), dataclasses.asdict(dot)
                f.write(json.dumps(record) + "\n")
    return path

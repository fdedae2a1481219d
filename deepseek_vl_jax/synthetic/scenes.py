"""Random scenes of simple shapes drawn with PIL."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"big": 0.20, "small": 0.11}  # radius as a fraction of the canvas
CANVAS = 128


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    x: float  # centre, as fractions of the canvas
    y: float
    r: float = 0.0  # half the width, as a fraction of the canvas; 0: the grid layout's size for `size`
    label: str = ""  # a digit's name ("seven") written small inside the shape (fine-detail scenes), or none

    @property
    def radius(self) -> float:
        return self.r or SIZES[self.size] * (0.8 if self.size == "big" else 1.0)

    @property
    def side(self) -> str:
        return "left" if self.x < 0.5 else "right"


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]


def random_scene(rng: np.random.Generator, max_shapes: int = 3, min_shapes: int = 1) -> Scene:
    """min_shapes..max_shapes shapes in distinct cells of a 2 x 3 grid (columns left/right of the centre, no
    overlaps)."""
    n = int(rng.integers(min_shapes, max_shapes + 1))
    cells = rng.choice(6, size=n, replace=False)
    shapes = []
    for cell in cells:
        col, row = int(cell % 2), int(cell // 2)
        size = str(rng.choice(list(SIZES)))
        jitter = rng.uniform(-0.04, 0.04, size=2)
        shapes.append(Shape(kind=str(rng.choice(SHAPES)), color=str(rng.choice(list(COLORS))), size=size,
                            x=float(0.25 + 0.5 * col + jitter[0]), y=float((row + 0.5) / 3 + jitter[1])))
    return Scene(tuple(shapes))


def draw(scene: Scene, canvas: int = CANVAS, style=None) -> Image.Image:
    """The scene as a picture: in the grid layout's plain style (white, hard edges), or in `style`
    (a `styles.Style`, which fixes its own canvas size)."""
    if style is not None:
        from deepseek_vl_jax.synthetic.styles import draw_styled

        return draw_styled(scene, style)
    return draw_grid(scene, canvas)


def draw_grid(scene: Scene, canvas: int = CANVAS) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        r = s.radius * canvas
        cx, cy = s.x * canvas, s.y * canvas
        fill = COLORS[s.color]
        if s.kind == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.kind == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img

"""Randomised drawing styles for the synthetic scenes: where shapes go, how big, on what background, how drawn.

A style family fixes the kinds of variation; `random_style` draws one concrete `Style` from a family, and
`styled_scene` a scene laid out for it. Families:
- "grid":     the original layout (a 2 x 3 grid, 128-px white canvas, hard edges); kept so the first demo model's
              held-out set is reproducible bit for bit.
- "solid":    free positions, sizes within a range per size class, canvas 96..192 px, a solid light background
              (off-white, grey or a pale tint), anti-aliasing on or off, colour jitter, optional dark outlines.
- "noise":    as "solid", on a background with mild per-pixel noise.
- "gradient": never used in training: a linear two-colour gradient background on a 256-px canvas (a background kind
              and canvas size no training family has), otherwise as "solid".
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepseek_vl_jax.synthetic.scenes import COLORS, SHAPES, SIZES, Scene, Shape, draw_grid, random_scene

FAMILIES = ("grid", "solid", "noise", "gradient")
TRAIN_FAMILIES = ("grid", "solid", "noise")
HELDOUT_FAMILY = "gradient"  # never drawn for a training row

# Radius as a fraction of the canvas; the ranges are far apart (smallest big / largest small = 1.45), so "big" and
# "small" stay unambiguous at any canvas size.
SIZE_RANGES = {"big": (0.145, 0.185), "small": (0.08, 0.10)}
CENTRE_GAP = 0.04  # every shape keeps this far (fraction of the canvas) from the vertical centre line
MAX_JITTER = 14  # per channel; every jittered colour stays nearest to its own name (checked in `jitter_color`)
SUPERSAMPLE = 4  # anti-aliased pictures are drawn this many times larger and downsampled
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LABEL_SIZE = 0.08  # a fine-detail label's font size as a fraction of the canvas (~10 px at 128, ~5 px at 64)


@dataclasses.dataclass(frozen=True)
class Style:
    """How one picture is drawn. Recorded with each row (`as_record`)."""
    family: str
    canvas: int = 128
    background: str = "solid"  # "solid" | "noise" | "gradient"
    colors: tuple[tuple[int, int, int], ...] = ((255, 255, 255),)  # one solid colour, or a gradient's two ends
    angle: float = 0.0  # gradient direction, radians
    noise: float = 0.0  # per-pixel standard deviation of the noise background
    antialias: bool = False
    outline: int = 0  # outline width in px (0: none)
    seed: int = 0  # the noise and colour jitter of this picture

    def as_record(self) -> dict:
        return {"family": self.family, "canvas": self.canvas, "background": self.background,
                "antialias": self.antialias, "outline": self.outline}


GRID = Style("grid")


def _light(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light background colour of low saturation: off-white, light grey or a pale tint (never close to a name)."""
    base = rng.uniform(205, 250)
    tint = rng.uniform(-12, 12, size=3)
    return tuple(int(np.clip(base + t, 0, 255)) for t in tint)


def random_style(rng: np.random.Generator, family: str) -> Style:
    if family == "grid":
        return GRID
    if family not in FAMILIES:
        raise ValueError(f"unknown style family {family!r}; choose from {', '.join(FAMILIES)}")
    canvas = 256 if family == "gradient" else int(rng.choice([96, 112, 128, 160, 192]))
    antialias = bool(rng.integers(2))
    outline = int(rng.choice([0, 0, 1, 2]))
    seed = int(rng.integers(2**31))
    if family == "gradient":
        return Style(family, canvas, "gradient", (_light(rng), _light(rng)), angle=float(rng.uniform(0, 2 * np.pi)),
                     antialias=antialias, outline=outline, seed=seed)
    noise = float(rng.uniform(4, 10)) if family == "noise" else 0.0
    return Style(family, canvas, family, (_light(rng),), noise=noise, antialias=antialias, outline=outline,
                 seed=seed)


def free_scene(rng: np.random.Generator, max_shapes: int = 3, tries: int = 200, labels: bool = False,
               min_shapes: int = 1) -> Scene:
    """min_shapes..max_shapes shapes at free positions: each wholly on one side of the centre line (at least CENTRE_GAP
    from it), inside the canvas and overlapping no other shape (bounding circles apart by a margin).
    labels=True: each shape carries a random digit (`Shape.label`), drawn small inside it."""
    while True:
        n = int(rng.integers(min_shapes, max_shapes + 1))
        shapes: list[Shape] = []
        for _ in range(tries):
            if len(shapes) == n:
                break
            size = str(rng.choice(list(SIZES)))
            r = float(rng.uniform(*SIZE_RANGES[size]))
            left = bool(rng.integers(2))
            lo, hi = (0.02 + r, 0.5 - CENTRE_GAP - r) if left else (0.5 + CENTRE_GAP + r, 0.98 - r)
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(0.02 + r, 0.98 - r))
            # Circumscribed circles (a square's corner is r*sqrt(2) from its centre) kept apart.
            if all(np.hypot(x - s.x, y - s.y) > 1.45 * (r + s.radius) + 0.02 for s in shapes):
                label = DIGITS[int(rng.integers(10))] if labels else ""
                shapes.append(Shape(kind=str(rng.choice(SHAPES)), color=str(rng.choice(list(COLORS))), size=size,
                                    x=x, y=y, r=r, label=label))
        if len(shapes) == n:
            return Scene(tuple(shapes))


def jitter_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """The named colour moved by up to MAX_JITTER per channel, redrawn until its nearest palette colour is its own."""
    base = np.asarray(COLORS[name], float)
    while True:
        c = np.clip(base + rng.uniform(-MAX_JITTER, MAX_JITTER, size=3), 0, 255)
        if nearest_color(c) == name:
            return tuple(int(v) for v in c)


def nearest_color(rgb) -> str:
    rgb = np.asarray(rgb, float)
    return min(COLORS, key=lambda k: float(np.sum((np.asarray(COLORS[k], float) - rgb) ** 2)))


def background(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] uint8."""
    first = np.asarray(style.colors[0], float)
    if style.background == "gradient":
        t = np.linspace(-0.5, 0.5, size)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        w = np.clip(xx * np.cos(style.angle) + yy * np.sin(style.angle) + 0.5, 0, 1)[..., None]
        img = first * (1 - w) + np.asarray(style.colors[1], float) * w
    else:
        img = np.broadcast_to(first, (size, size, 3)).copy()
    if style.noise:
        img += rng.normal(0, style.noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_styled(scene: Scene, style: Style) -> Image.Image:
    """The scene drawn in `style` (the background's noise and colour jitter come from `style.seed`)."""
    if style.family == "grid":
        return draw_grid(scene, style.canvas)
    rng = np.random.default_rng(style.seed)
    scale = SUPERSAMPLE if style.antialias else 1
    size = style.canvas * scale
    # The noise is drawn at the output size, so it is not averaged away by the downsampling.
    base = background(style, style.canvas, rng)
    img = Image.fromarray(base).resize((size, size), Image.NEAREST) if scale > 1 else Image.fromarray(base)
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        r, cx, cy = s.radius * size, s.x * size, s.y * size
        fill = jitter_color(s.color, rng)
        outline = tuple(int(v * 0.45) for v in fill) if style.outline else None
        width = style.outline * scale
        if s.kind == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        elif s.kind == "square":
            pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        else:
            pts = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
            pen.polygon(pts, fill=fill, outline=outline, width=width)
    img = img.resize((style.canvas, style.canvas), Image.BOX) if scale > 1 else img
    if any(s.label for s in scene.shapes):
        draw_labels(img, scene)
    return img


def draw_labels(img: Image.Image, scene: Scene) -> None:
    """Each shape's digit, in place: black on yellow and orange, white on the darker colours. A triangle's label
    sits lower, inside its incircle. The font is Pillow's bundled one (the same glyphs on every machine)."""
    size = img.size[0]
    font = ImageFont.load_default(size=max(6, round(LABEL_SIZE * size)))
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        if s.label:
            dy = 0.38 * s.radius if s.kind == "triangle" else 0.0
            ink = (0, 0, 0) if s.color in ("yellow", "orange") else (255, 255, 255)
            pen.text((s.x * size, (s.y + dy) * size), str(DIGITS.index(s.label)), fill=ink, font=font, anchor="mm")


def styled_scene(rng: np.random.Generator, family: str, labels: bool = False,
                 min_shapes: int = 1) -> tuple[Scene, Style]:
    """One scene and its style, for `family`; "grid" draws exactly what `random_scene` always drew. labels=True (not
    for "grid"): fine-detail scenes, a digit inside each shape. min_shapes: at least this many shapes (of at most 3)."""
    if family == "grid":
        if labels:
            raise ValueError("the grid family has no fine-detail labels; use solid, noise or gradient")
        return random_scene(rng, min_shapes=min_shapes), GRID
    style = random_style(rng, family)
    return free_scene(rng, labels=labels, min_shapes=min_shapes), style

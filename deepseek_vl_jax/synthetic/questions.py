"""Questions with one-word answers about a scene; only questions whose answer is unambiguous are asked."""

from __future__ import annotations

from collections import Counter

import numpy as np

from deepseek_vl_jax.synthetic.scenes import Scene

NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_KINDS = ("color", "shape", "count", "side", "size", "number")  # "number": fine-detail scenes only
DESCRIBE = "Describe the picture."


def _by_object(scene: Scene) -> list[tuple[int, str, str, str]]:
    """(object, kind, question, answer) for every unambiguous question about the scene; object -1 = the whole scene."""
    out = [(-1, "count", "How many shapes are there?", NUMBERS[len(scene.shapes)])]
    kinds = Counter(s.kind for s in scene.shapes)
    colors = Counter(s.color for s in scene.shapes)
    pairs = Counter((s.color, s.kind) for s in scene.shapes)
    for i, s in enumerate(scene.shapes):
        if kinds[s.kind] == 1:
            out.append((i, "color", f"What color is the {s.kind}?", s.color))
        if colors[s.color] == 1:
            out.append((i, "shape", f"What shape is the {s.color} object?", s.kind))
        if pairs[(s.color, s.kind)] == 1:
            out.append((i, "side", f"Is the {s.color} {s.kind} on the left or the right?", s.side))
            out.append((i, "size", f"Is the {s.color} {s.kind} big or small?", s.size))
            if s.label:
                out.append((i, "number", f"What number is on the {s.color} {s.kind}?", s.label))
    return out


def _candidates(scene: Scene) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for every unambiguous question about the scene."""
    return [c[1:] for c in _by_object(scene)]


def _draw(cands: list[tuple[int, str, str, str]], rng: np.random.Generator) -> tuple[int, str, str, str]:
    """One of `_by_object`'s candidates: its kind drawn uniformly among the kinds present, then one of that kind."""
    kinds = sorted({c[1] for c in cands})
    kind = kinds[int(rng.integers(len(kinds)))]
    options = [c for c in cands if c[1] == kind]
    return options[int(rng.integers(len(options)))]


def ask(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str, str]:
    """One (kind, question, answer), the kind drawn uniformly among those the scene allows (or `kind`: one of that
    kind, which the scene must allow; every scene allows "count")."""
    cands = _by_object(scene)
    return _draw([c for c in cands if c[1] == kind] if kind else cands, rng)[1:]


def ask_several(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """Up to `n` questions about one scene, each of a different kind (kinds in random order). Several questions
    about the same picture make a model bind each question to its object rather than guess from the picture."""
    cands = _candidates(scene)
    kinds = sorted({k for k, _, _ in cands})
    out = []
    for kind in [kinds[i] for i in rng.permutation(len(kinds))[:n]]:
        options = [c for c in cands if c[0] == kind]
        out.append(options[int(rng.integers(len(options)))])
    return out


def ask_turns(scene: Scene, rng: np.random.Generator, n: int, kind: str | None = None) -> list[tuple[str, str, str]]:
    """Up to `n` questions for the turns of one chat about the scene. The whole scene and each shape are the subject
    of at most one question, so no turn's question or answer gives away another's answer and every answer must be
    read from the picture; each question's kind is drawn uniformly among the kinds still possible. Several shapes
    asked about in one chat contrast them: the answer depends on which shape the question names. kind: only
    questions of this kind (e.g. "side": a turn per shape the scene allows, a position-heavy chat)."""
    left = [c for c in _by_object(scene) if kind is None or c[1] == kind]
    out = []
    while left and len(out) < n:
        subject, *asked = _draw(left, rng)
        out.append(tuple(asked))
        left = [c for c in left if c[0] != subject]
    return out


def describe(scene: Scene) -> str:
    """A caption naming every shape with its size, colour, number (fine-detail scenes) and side, top to bottom then
    left to right."""
    parts = [f"a {s.size} {s.color} {s.kind}{f' with a {s.label}' if s.label else ''} on the {s.side}"
             for s in sorted(scene.shapes, key=lambda s: (round(s.y * 3), s.x))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

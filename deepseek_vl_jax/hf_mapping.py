"""The mapping between transformers' DeepSeek-VL state-dict keys and this package's Flax parameter tree.

A table of prefix renames plus small per-key transforms that run both ways:
- Linear `weight` [out, in]  <-> Dense `kernel` [in, out]           (transpose)
- Conv2d `weight` [O, I, h, w] <-> Conv `kernel` [h, w, I, O]        (OIHW <-> HWIO)
- LayerNorm/RMSNorm `weight` <-> `scale`; Embedding `weight` <-> `embedding`; `bias` <-> `bias`
- scanned stacks: Flax `.../layers/...` with a leading layer axis <-> HF `....layers.{i}....`, one key per layer
- unscanned numbered layers: Flax `layers_3` <-> HF `layers.3`
The Flax tree (from `jax.eval_shape` of the module's init) is the source of truth for which tensors exist, so
every HF key must be used and every Flax leaf filled: `plan` reports both kinds of mismatch.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Callable, Iterable, Mapping

import numpy as np

# Flax path prefix -> HF key prefix; the longest matching prefix wins. Paths not listed get "model." prepended.
PREFIXES: dict[tuple[str, ...], str] = {
    ("vision_model", "patch_embedding"): "model.vision_model.embeddings.patch_embedding",
    ("vision_model", "position_embedding"): "model.vision_model.embeddings.position_embedding.weight",
    ("vision_model", "layers"): "model.vision_model.encoder.layers",
    ("vision_model", "head", "in_proj_kernel"): "model.vision_model.head.attention.in_proj_weight",
    ("vision_model", "head", "in_proj_bias"): "model.vision_model.head.attention.in_proj_bias",
    ("vision_model", "head", "out_proj"): "model.vision_model.head.attention.out_proj",
    ("language_model", "lm_head"): "lm_head",
    ("high_res_vision_model",): "model.high_res_vision_model.vision_encoder",
}
# Leaf names that are renamed (and how the tensor changes). Other leaves keep their name and layout.
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
STACKED = "layers"  # a path element that marks a scanned stack (leading layer axis)
_NUMBERED = re.compile(r"^(.*)_(\d+)$")


class Transform(enum.Enum):
    IDENTITY = "identity"
    LINEAR = "linear"  # transpose a 2-D matrix
    CONV = "conv"  # OIHW <-> HWIO

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return x.T
        if self is Transform.CONV:
            return x.transpose(2, 3, 1, 0)
        return x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.LINEAR:
            return x.T
        if self is Transform.CONV:
            return x.transpose(3, 2, 0, 1)
        return x


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Flax leaf and the HF key(s) it comes from: one key, or one per layer for a scanned stack."""

    path: tuple[str, ...]
    hf_keys: tuple[str, ...]
    transform: Transform
    stacked: bool
    shape: tuple[int, ...]  # the Flax shape

    def hf_shape(self) -> tuple[int, ...]:
        """The shape of one HF tensor (one layer's, for a stack)."""
        probe = np.empty(self.shape[1:] if self.stacked else self.shape, dtype=np.uint8)
        return self.transform.to_hf(probe).shape


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF key template for a Flax path ('{i}' where the layer index goes) and whether it is stacked."""
    best = max((p for p in PREFIXES if path[:len(p)] == p), key=len, default=None)
    if best is None:
        head, rest = "model", path
    else:
        head, rest = PREFIXES[best], path[len(best):]
    parts, stacked = [head] if head else [], False
    if best is not None and best[-1] == STACKED:
        parts.append("{i}")
        stacked = True
    for i, name in enumerate(rest):
        last = i == len(rest) - 1
        if name == STACKED and not last:
            parts += [name, "{i}"]
            stacked = True
            continue
        m = _NUMBERED.match(name)
        if m and not last:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(LEAF_NAMES.get(name, name) if last else name)
    return ".".join(parts), stacked


def _transform(path: tuple[str, ...], ndim: int) -> Transform:
    leaf = path[-1]
    if leaf == "in_proj_kernel":
        return Transform.LINEAR
    if leaf != "kernel":
        return Transform.IDENTITY
    return {2: Transform.LINEAR, 4: Transform.CONV}[ndim]


def _flatten(tree, prefix=()) -> Iterable[tuple[tuple[str, ...], object]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def entries(template) -> list[Entry]:
    """The table for a Flax param tree (arrays or ShapeDtypeStructs; nested dicts)."""
    out = []
    for path, leaf in _flatten(template):
        key, stacked = _hf_name(path)
        shape = tuple(leaf.shape)
        transform = _transform(path, len(shape) - int(stacked))
        keys = tuple(key.format(i=i) for i in range(shape[0])) if stacked else (key,)
        out.append(Entry(path, keys, transform, stacked, shape))
    return out


class MappingError(ValueError):
    """The checkpoint's tensors and the model's parameters do not correspond."""


def check(table: list[Entry], hf_shapes: Mapping[str, tuple[int, ...]], ignore: Iterable[str] = ()) -> None:
    """Raise MappingError naming every missing, unexpected and mis-shaped tensor."""
    wanted = {k: e for e in table for k in e.hf_keys}
    ignore = set(ignore)
    missing = sorted(k for k in wanted if k not in hf_shapes)
    unexpected = sorted(k for k in hf_shapes if k not in wanted and k not in ignore)
    mismatched = sorted(f"{k}: checkpoint {tuple(hf_shapes[k])}, model expects {wanted[k].hf_shape()}"
                        for k in wanted if k in hf_shapes and tuple(hf_shapes[k]) != wanted[k].hf_shape())
    problems = []
    for what, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                        ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise MappingError("checkpoint does not match the model config; " + "; ".join(problems))


def to_flax(entry: Entry, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """Assemble one Flax leaf from HF tensors (`get(key)` returns a numpy array)."""
    if entry.stacked:
        return np.stack([entry.transform.to_flax(np.asarray(get(k))) for k in entry.hf_keys])
    return entry.transform.to_flax(np.asarray(get(entry.hf_keys[0])))


def to_hf(entry: Entry, leaf: np.ndarray) -> Iterable[tuple[str, np.ndarray]]:
    """The HF tensors (key, contiguous array) of one Flax leaf."""
    leaf = np.asarray(leaf)
    if entry.stacked:
        for k, x in zip(entry.hf_keys, leaf):
            yield k, np.ascontiguousarray(entry.transform.to_hf(x))
    else:
        yield entry.hf_keys[0], np.ascontiguousarray(entry.transform.to_hf(leaf))


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_to_flax(tensors: Mapping[str, np.ndarray], template) -> dict:
    """Map a whole HF state dict (numpy arrays, full transformers key names such as
    `model.vision_model.encoder.layers.0.mlp.fc1.weight`) onto a Flax param template; checks both directions.

    For one module alone, wrap its template under its top-level name, e.g. `{"high_res_vision_model": t}`, and
    give the HF keys their full names."""
    table = entries(template)
    check(table, {k: np.shape(v) for k, v in tensors.items()})
    params: dict = {}
    for e in table:
        set_path(params, e.path, to_flax(e, tensors.__getitem__))
    return params


def flax_to_hf(params) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_flax`: a state dict with transformers' key names."""
    out = {}
    leaves = dict(_flatten(params))
    for e in entries(params):
        out.update(to_hf(e, leaves[e.path]))
    return out

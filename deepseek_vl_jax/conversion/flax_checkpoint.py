"""The self-contained Flax checkpoint directory, and reading the training output layout.

A Flax checkpoint directory (what `deepseek-vl-jax convert` and `save_flax_checkpoint` write):

    DST/
      deepseek_vl_jax_checkpoint.json  marker + metadata: {"format": "deepseek-vl-jax/flax", "format_version": 1,
                                       "params": "params", "dtype", "num_parameters", "nbytes", "source", ...}
      params/                          Orbax PyTree checkpoint (OCDBT + zarr3) of the Flax param tree: nested dict,
                                       module names as in `DeepseekVL`, scanned stacks with a leading layer axis
      config.json                      the HF config (what transformers writes; `dtype` = the stored dtype)
      tokenizer.json, processor_config.json, ...   the tokenizer/processor files, copied verbatim

The training output layout (written by `ocp.CheckpointManager` with item `params` and `ocp.args.StandardSave`):

    OUT/config.json, OUT/<processor files>, OUT/checkpoints/<step>/params/   (the latest step is used)

Both hold the same Orbax tree (unboxed Flax params), so `restore_params` and `export` read either.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from flax.core import meta

from deepseek_vl_jax import hf_mapping, sharding
from deepseek_vl_jax.checkpoint_kinds import (  # noqa: F401 — re-exported
    MARKER, TRAINING_CHECKPOINTS, is_flax_checkpoint, is_training_output)
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.conversion import atomic, orbax_io

FORMAT = "deepseek-vl-jax/flax"
FORMAT_VERSION = 1
PARAMS = "params"
CONFIG = "config.json"

# Files that hold weights (never copied as "processor files").
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|msgpack|h5|gguf|npz)$|.*\.index\.json$")


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def read_marker(path: str | os.PathLike) -> dict:
    file = os.path.join(os.fspath(path), MARKER)
    try:
        with open(file) as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable checkpoint marker ({e})") from e
    if marker.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} checkpoint (format {marker.get('format')!r})")
    if marker.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {marker['format_version']} is newer than this library reads "
                         f"({FORMAT_VERSION})")
    return marker


def training_steps(out: str | os.PathLike) -> list[int]:
    """The finished steps in OUT/checkpoints, oldest first."""
    root = os.path.join(os.fspath(out), TRAINING_CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, PARAMS)))


def latest_training_step(out: str | os.PathLike) -> int | None:
    """The newest finished step in OUT/checkpoints (numeric directory names with a `params` item), or None."""
    root = os.path.join(os.fspath(out), TRAINING_CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    steps = [int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, PARAMS))]
    return max(steps) if steps else None


@dataclasses.dataclass(frozen=True)
class FlaxSource:
    """Where a Flax checkpoint's pieces are: the Orbax params, the directory with config.json and processor files."""

    params_dir: str
    root: str
    kind: str  # "flax" (convert output) or "training" (OUT/checkpoints/<step>/params)
    step: int | None = None
    base: dict | None = None  # a training checkpoint of its trainable leaves only: its frozen base (`frozen_base`)

    @property
    def config_file(self) -> str:
        return os.path.join(self.root, CONFIG)


def resolve(path: str | os.PathLike, step: int | None = None) -> FlaxSource:
    """Find the params of a Flax checkpoint directory or a training output directory (latest step by default)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    if is_flax_checkpoint(path):
        marker = read_marker(path)
        params = os.path.join(path, marker.get("params", PARAMS))
        if not os.path.isdir(params):
            raise FileNotFoundError(f"{path}: the marker names params directory {params}, which is missing")
        return FlaxSource(params, path, "flax")
    if os.path.isdir(os.path.join(path, TRAINING_CHECKPOINTS)):
        chosen = latest_training_step(path) if step is None else step
        params = os.path.join(path, TRAINING_CHECKPOINTS, str(chosen), PARAMS)
        if chosen is None or not os.path.isdir(params):
            steps = training_steps(path)
            have = f"; the steps there are {steps}" if steps else "; it holds no finished checkpoint yet"
            raise FileNotFoundError(f"{path}: no finished step with a '{PARAMS}' item under {TRAINING_CHECKPOINTS}/"
                                    + ("" if step is None else f" (asked for step {step})") + have)
        from deepseek_vl_jax.conversion import frozen_base

        return FlaxSource(params, path, "training", chosen, frozen_base.read_record(path, chosen))
    raise FileNotFoundError(f"{path}: neither a Flax checkpoint ({MARKER}) nor a training output "
                            f"({TRAINING_CHECKPOINTS}/<step>/{PARAMS})")


def stored_leaves(source: FlaxSource) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{flat path: (shape, dtype)} of every stored leaf: the params item's, and a trainable-only checkpoint's frozen
    base's (loaded from its model directory, see `frozen_base`)."""
    out = orbax_io.leaf_metadata(source.params_dir)
    if source.base is not None:
        from deepseek_vl_jax.conversion import frozen_base

        base = frozen_base.host_leaves(source.base, f"checkpoint {source.params_dir}")
        out.update({p: (tuple(x.shape), x.dtype) for p, x in base.items()})
    return out


def read_leaves(source: FlaxSource, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    """The stored leaves `paths` as numpy arrays (a trainable-only checkpoint's frozen ones from its base)."""
    base = {}
    if source.base is not None:
        from deepseek_vl_jax.conversion import frozen_base

        base = frozen_base.host_leaves(source.base, f"checkpoint {source.params_dir}")
    stored = [p for p in paths if p not in base]
    out = orbax_io.restore_leaves_numpy(source.params_dir, stored) if stored else {}
    out.update({p: base[p] for p in paths if p in base})
    return out


def read_config_dict(source: FlaxSource) -> dict:
    if not os.path.isfile(source.config_file):
        raise FileNotFoundError(f"{source.root}: no {CONFIG}")
    with open(source.config_file) as f:
        return json.load(f)


def with_dtype(config_dict: Mapping[str, Any], dtype: str) -> dict:
    """A copy of an HF config dict whose dtype field (`dtype`, or the older `torch_dtype`) says `dtype`."""
    out = dict(config_dict)
    key = "torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"
    out[key] = dtype
    return out


def auxiliary_files(src: str | os.PathLike, selective: bool = False) -> list[str]:
    """Names of the tokenizer/processor (and generation config) files of a directory.

    Every regular, non-hidden file that is not a weight file, `config.json` or a checkpoint marker; with `selective`
    (a training output directory, which may hold logs) only the processor package's PROCESSOR_FILES and
    `generation_config.json`."""
    src = os.fspath(src)
    if not src or not os.path.isdir(src):
        return []
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n)) and not n.startswith("."))
    if selective:
        try:
            from deepseek_vl_jax.processing import PROCESSOR_FILES
        except ImportError:  # the processor package is optional here
            PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                               "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                               "chat_template.json")
        wanted = set(PROCESSOR_FILES) | {"generation_config.json"}
        return [n for n in names if n in wanted]
    return [n for n in names if n not in (CONFIG, MARKER) and not _WEIGHT_FILE.match(n)]


def copy_auxiliary_files(src: str | os.PathLike | None, dst: str, selective: bool = False) -> list[str]:
    if src is None:
        return []
    names = auxiliary_files(src, selective)
    for n in names:
        shutil.copyfile(os.path.join(os.fspath(src), n), os.path.join(dst, n))
    return names


def flat_leaves(tree) -> dict[tuple[str, ...], Any]:
    return dict(hf_mapping._flatten(tree))


def check_tree(template_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
               got_shapes: Mapping[tuple[str, ...], tuple[int, ...]], what: str) -> None:
    """Raise MappingError naming every missing, unexpected and mis-shaped parameter."""
    fmt = "/".join
    missing = sorted(fmt(k) for k in template_shapes if k not in got_shapes)
    unexpected = sorted(fmt(k) for k in got_shapes if k not in template_shapes)
    bad = sorted(f"{fmt(k)}: {what} {tuple(got_shapes[k])}, model expects {tuple(template_shapes[k])}"
                 for k in template_shapes if k in got_shapes and tuple(got_shapes[k]) != tuple(template_shapes[k]))
    problems = []
    for label, items in (("missing parameters", missing), ("unexpected parameters", unexpected),
                         ("shape mismatches", bad)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise hf_mapping.MappingError(f"{what} does not match the model config; " + "; ".join(problems))


@functools.lru_cache(maxsize=8)
def _abstract(config: ModelConfig):
    from deepseek_vl_jax.pretrained import abstract_params
    return abstract_params(config)


def abstract(config: ModelConfig):
    """`pretrained.abstract_params` (boxed shapes with logical axes), cached per architecture: tracing the model's
    init takes seconds and convert / export / restore each need it."""
    key = config.replace(dtype="float32", param_dtype="float32", checkpoint_dtype=None, remat_policy="none")
    try:
        hash(key)
    except TypeError:  # a config with an unhashable field: no caching
        return _abstract.__wrapped__(key)
    return _abstract(key)


def template_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_leaves(meta.unbox(abstract(config))).items()}


def write_into(directory: str, config_dict: Mapping[str, Any], params, processor_src=None, *,
               selective: bool = False, metadata: Mapping[str, Any] | None = None,
               template: Mapping[tuple[str, ...], tuple[int, ...]] | None = None) -> dict:
    """Write a Flax checkpoint into an existing empty (temporary) directory; returns the marker written.

    params: nested dict of numpy / jax.Array / `orbax_io.LazyArray` leaves in the Flax layout; checked against the
    model that `config_dict` describes before anything is written (`template`: its {path: shape}, if known)."""
    config = ModelConfig.from_hf(dict(config_dict))
    leaves = flat_leaves(params)
    check_tree(template or template_shapes(config), {k: tuple(v.shape) for k, v in leaves.items()}, "params")
    dtypes = sorted({dtype_name(v.dtype) for v in leaves.values()})
    stored = dtypes[0] if len(dtypes) == 1 else "mixed"
    orbax_io.save_pytree(os.path.join(directory, PARAMS), params)
    cfg = with_dtype(config_dict, stored) if stored != "mixed" else dict(config_dict)
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    copied = copy_auxiliary_files(processor_src, directory, selective)
    marker = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "params": PARAMS, "dtype": stored,
        "model_type": config.model_type.value,
        "num_parameters": int(sum(int(np.prod(v.shape, dtype=np.int64)) for v in leaves.values())),
        "nbytes": int(sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize
                          for v in leaves.values())),
        "processor_files": copied,
        **dict(metadata or {}),
    }
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
    return marker


def save_flax_checkpoint(dst: str | os.PathLike, config_dict: Mapping[str, Any], params,
                         processor_src: str | os.PathLike | None = None, *, force: bool = False,
                         metadata: Mapping[str, Any] | None = None) -> str:
    """Save Flax params (nested dict; jax.Array, numpy or `LazyArray` leaves, any sharding) with their HF
    `config_dict` and the processor files of `processor_src` as a self-contained Flax checkpoint directory.

    Atomic: written into a temporary sibling and renamed to `dst` when complete; an existing `dst` is an error
    unless `force` (then replaced only after the new one is complete). Returns `dst`."""
    with atomic.staged_directory(dst, force) as tmp:
        write_into(tmp, config_dict, meta.unbox(params), processor_src, metadata=metadata)
    return os.fspath(dst)


def restore_params(path: str | os.PathLike, config: ModelConfig, dtype: str | None = None, mesh=None,
                   step: int | None = None, quantize=None, scale_dtype: str | None = None):
    """Restore the params of a Flax checkpoint directory (or a training output directory) straight into `dtype`
    (default: `config.param_dtype`) and, with `mesh`, into the rules table's shardings (`sharding.param_shardings`).

    A quantized checkpoint (its marker says so) restores quantized as stored; `quantize` (see `load_pretrained`)
    quantizes a float one tensor by tensor, and must agree with a quantized one's settings. Scales in
    `scale_dtype` (default: `config.dtype`).
    Every stored parameter must exist in the model and match its shape (MappingError otherwise)."""
    from deepseek_vl_jax import common
    from deepseek_vl_jax.quantization import checkpoint as quantized

    source = resolve(path, step)
    if source.base is not None:
        return _restore_with_base(source, config, dtype, mesh, quantize, scale_dtype)
    boxed = abstract(config)
    stored = quantized.stored_config(read_marker(source.root) if source.kind == "flax" else None)
    qconfig = quantized.choose(stored, quantize, source.root)
    if qconfig is not None:
        return quantized.restore(source.params_dir, boxed, qconfig, stored is not None,
                                 dtype or config.param_dtype, scale_dtype or config.dtype, mesh)
    shapes = meta.unbox(boxed)
    stored = orbax_io.leaf_metadata(source.params_dir)
    check_tree({k: tuple(v.shape) for k, v in flat_leaves(shapes).items()},
               {k: s for k, (s, _) in stored.items()}, f"checkpoint {source.params_dir}")
    target_dtype = common.to_dtype(dtype or config.param_dtype)
    if mesh is not None:
        shardings = sharding.param_shardings(boxed, mesh)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, target_dtype, sharding=sh), shapes, shardings)
    return orbax_io.restore_pytree(source.params_dir, target)


def _restore_with_base(source: FlaxSource, config: ModelConfig, dtype, mesh, quantize, scale_dtype):
    """`restore_params` of a trainable-only training checkpoint: the frozen base loaded as the run loaded it (and
    checked against its fingerprint), the trained leaves restored onto their shardings, then cast to `dtype` /
    quantized as `quantize` asks (a QLoRA base stays as stored)."""
    from deepseek_vl_jax import common
    from deepseek_vl_jax.conversion import frozen_base
    from deepseek_vl_jax.quantization import QTensor, QuantizeConfig, quantize_params
    from deepseek_vl_jax.quantization import checkpoint as quantized

    rec = source.base
    stored = orbax_io.leaf_metadata(source.params_dir)
    boxed = abstract(config)
    shapes = {k: tuple(v.shape) for k, v in flat_leaves(meta.unbox(boxed)).items()}
    base_q = QuantizeConfig.create(rec["quantize"]) if rec["quantize"] else None
    qconfig = quantized.choose(base_q, quantize, source.root)
    frozen = frozen_base.load(rec, f"checkpoint {source.params_dir}", mesh)
    check_tree(shapes, {**{k: s for k, (s, _) in stored.items()},
                        **{k: shapes[k] for k, _ in hf_mapping._flatten(frozen) if k in shapes}},
               f"checkpoint {source.params_dir}")
    target_dtype = common.to_dtype(dtype or config.param_dtype)
    flat_shardings = dict(hf_mapping._flatten(sharding.param_shardings(boxed, mesh))) if mesh is not None else {}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for k, (s, _) in stored.items():
        hf_mapping.set_path(target, k, jax.ShapeDtypeStruct(s, target_dtype, sharding=flat_shardings.get(k, one)))
    trained = orbax_io.restore_pytree(source.params_dir, target)
    frozen = jax.tree.map(lambda x: x if isinstance(x, QTensor) or x.dtype == target_dtype else x.astype(target_dtype),
                          frozen, is_leaf=lambda x: isinstance(x, QTensor))
    params = {**frozen, **trained}
    if qconfig is not None and base_q is None:  # quantized now, tensor by tensor as `load_pretrained` would
        params = quantize_params(params, boxed, qconfig, scale_dtype or config.dtype, mesh)
    return params

"""`deepseek-vl-jax convert SRC DST`: an HF (or original deepseek-ai) checkpoint directory -> a Flax checkpoint.

An original directory's processor is rewritten (`processing.original`), never copied: the original towers normalise
their pixels, the converted model expects the image processor to. Streams tensor by tensor: each Flax leaf is
assembled from memory-mapped source tensors (transposed, stacked over layers, cast: `fast_mapping`), written by
Orbax and dropped before the next (see `orbax_io`); the source pages are released after each tensor, so peak
memory is about the largest leaf, not the checkpoint. Writes into a temporary sibling of
DST and renames it at the end (see `atomic`).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys
from typing import Any

import numpy as np
from flax.core import meta

from deepseek_vl_jax import hf_mapping
from deepseek_vl_jax.config import ConfigError, ModelConfig
from deepseek_vl_jax.conversion import atomic, fast_mapping, flax_checkpoint, orbax_io, original_config
from deepseek_vl_jax.conversion.original_layout import OriginalCheckpoint
from deepseek_vl_jax.quantization import cli as quantize_cli
from deepseek_vl_jax.safetensors_io import CheckpointReader

LAYOUTS = ("auto", "hf", "original")
DTYPES = ("bfloat16", "float32", "float16")


def read_config(src: str) -> dict:
    file = os.path.join(src, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"{src}: no config.json")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def detect_layout(config_dict: dict) -> str:
    """'hf' for transformers' deepseek_vl / deepseek_vl_hybrid, 'original' for deepseek-ai's multi_modality."""
    if original_config.is_original_config(config_dict):
        return "original"
    return "hf"  # ModelConfig.from_hf names an unknown model_type clearly


def _release_pages(reader: CheckpointReader) -> None:
    """Drop the source pages this process has touched (they stay in the page cache, out of our RSS)."""
    for f in reader.files.values():
        m = getattr(f, "_mmap", None)
        if m is not None and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)


def _source(src: str, layout: str):
    """(HF config dict, tensors under HF names, metadata about the source)."""
    raw = read_config(src)
    found = detect_layout(raw)
    if layout == "auto":
        layout = found
    elif layout != found:
        raise ConfigError(f"{src}: --layout {layout} given, but its config.json is the {found} layout")
    reader = CheckpointReader(src)
    if layout == "hf":
        return raw, reader, reader, {"layout": "hf"}
    hf = original_config.hf_config_from_original(raw, src)
    tensors = OriginalCheckpoint(reader, hf["model_type"] == "deepseek_vl_hybrid", hf["tie_word_embeddings"])
    return hf, tensors, reader, {"layout": "original", "original_config": raw,
                                 "dropped": [f"{k} ({why})" for k, why in tensors.dropped]}


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, layout: str = "auto",
            force: bool = False, progress: bool = True, quantize=None) -> dict:
    """Convert a checkpoint directory to a Flax checkpoint directory at `dst`; returns the marker written.

    dtype: store every parameter in this dtype (default: each tensor's own). layout: 'hf', 'original' or 'auto'.
    quantize: None, "int8", "int4" or a `quantization.QuantizeConfig`: the selected tensors are stored quantized
    (values and scales, scales in the tensor's stored dtype), each quantized as it is written.
    Raises (and leaves nothing at `dst`) on a missing shard, a truncated file, unknown or missing tensors, shape
    mismatches and unknown model types."""
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory")
    if os.path.commonpath([src, dst]) == src:
        raise ValueError(f"DST {dst} must not be inside SRC {src}")
    atomic.check_destination(dst, force)
    qconfig = _quantize_config(quantize)
    hf_config, tensors, reader, source_meta = _source(src, layout)
    config = ModelConfig.from_hf(hf_config)
    shapes = meta.unbox(flax_checkpoint.abstract(config))
    table = hf_mapping.entries(shapes)
    ignore = ["lm_head.weight"] if config.tie_word_embeddings else []
    hf_mapping.check(table, {k: tensors.shape(k) for k in tensors.keys()}, ignore=ignore)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        source_meta.setdefault("dropped", []).append("lm_head.weight (tied to the token embeddings)")
    template = {e.path: e.shape for e in table}
    qplan = {}
    if qconfig is not None:
        from deepseek_vl_jax.quantization import checkpoint as quantized
        from deepseek_vl_jax.quantization import params as qparams

        qplan = qparams.plan(flax_checkpoint.abstract(config), qconfig)  # errors before anything is written
        template = quantized.template_shapes(flax_checkpoint.abstract(config), qconfig, np.float32)
    target = np.dtype(_np_dtype(dtype)) if dtype else None
    leaf_dtype = {e.path: target or np.dtype(tensors.dtype(e.hf_keys[0])) for e in table}
    total = sum(int(np.prod(e.shape, dtype=np.int64)) * leaf_dtype[e.path].itemsize for e in table)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {os.path.basename(src)}")

    def make(entry):
        def fn():
            x = fast_mapping.leaf_from_hf(entry, tensors.get, leaf_dtype[entry.path],
                                          after_each=lambda: _release_pages(reader))
            if bar is not None:
                bar.update(x.nbytes)
            return x
        return fn

    params: dict = {}
    for e in table:
        if e.path in qplan:
            for path, leaf in _quantized_leaves(e, qplan[e.path], leaf_dtype[e.path], make(e)).items():
                hf_mapping.set_path(params, path, leaf)
        else:
            hf_mapping.set_path(params, e.path, orbax_io.LazyArray(e.shape, leaf_dtype[e.path], make(e)))
    metadata = {"created_by": "deepseek-vl-jax convert",
                "source": {"path": src, "bytes": reader.nbytes, **source_meta}}
    if qconfig is not None:
        metadata[quantized.MARKER_KEY] = qconfig.to_dict()
    processor = _original_processor(src) if source_meta["layout"] == "original" else None
    try:
        with atomic.staged_directory(dst, force) as tmp:
            if processor is not None:
                metadata["processor_files"] = sorted(os.path.basename(f) for f in processor.save_pretrained(tmp))
            marker = flax_checkpoint.write_into(tmp, hf_config, params, src if processor is None else None,
                                                metadata=metadata, template=template)
    finally:
        if bar is not None:
            bar.close()
    return marker


def _original_processor(src: str):
    """The processor of an original directory, rewritten for this library and transformers: the towers'
    normalisation moved into the image processor, the original's resize rounding and hybrid low-res image, the
    `deepseek` conversation format as chat template, eos as pad token, left padding (`processing.original`).
    None when its processor files are not deepseek-ai's (e.g. transformers' processor beside original-layout
    weights, as `to_original_layout` writes): those are copied as they are."""
    from deepseek_vl_jax.processing import original as original_processing
    from deepseek_vl_jax.processing.errors import ProcessorConfigError

    if not original_processing.is_original_processor_dir(src):
        return None
    try:
        return original_processing.load_original_processor(src)
    except ProcessorConfigError as e:
        raise ConfigError(str(e)) from e


def _quantize_config(quantize):
    if quantize is None:
        return None
    from deepseek_vl_jax.quantization import QuantizeConfig
    return QuantizeConfig.create(quantize)


def _quantized_leaves(entry, leaf, dtype, make_float) -> dict:
    """Two lazy leaves (values, scales) of one quantized parameter; the float tensor is made and quantized once,
    when the first of them is written, and dropped when the second is."""
    from deepseek_vl_jax.quantization import params as qparams

    memo: dict = {}
    vshape, vdtype, sshape = qparams.leaf_shapes(entry.shape, leaf)

    def part(name):
        def fn():
            if not memo:
                qt = qparams.quantize_leaf(make_float(), leaf, dtype, entry.path)
                memo.update({qparams.VALUES: qt.values, qparams.SCALES: qt.scales})
            return memo.pop(name)
        return fn

    return {entry.path + (qparams.VALUES,): orbax_io.LazyArray(vshape, vdtype, part(qparams.VALUES)),
            entry.path + (qparams.SCALES,): orbax_io.LazyArray(sshape, np.dtype(dtype), part(qparams.SCALES))}


def _np_dtype(name: str):
    from deepseek_vl_jax import common
    return common.to_dtype(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF checkpoint directory (safetensors, single or sharded) or an original "
                                    "deepseek-ai directory")
    parser.add_argument("dst", help="output Flax checkpoint directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="store the parameters in this dtype (default: keep the checkpoint's)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="source layout: transformers' (hf), deepseek-ai's (original), or detect (auto)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST (only after the new checkpoint is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    quantize_cli.add_arguments(parser, "store the decoder's linear layers quantized (weight-only)")


def handle_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that the temporary directory is removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def report_errors(fn, *args, **kwargs) -> int:
    """Run `fn` and return 0; its errors propagate to `cli.main`, which prints each as one `error:` line (exit 2
    for the user's mistakes, 3 for a full or read-only disk)."""
    fn(*args, **kwargs)
    return 0


def run(args: Any) -> int:
    handle_sigterm()
    status = report_errors(convert, args.src, args.dst, dtype=args.dtype, layout=args.layout, force=args.force,
                           progress=args.progress, quantize=quantize_cli.from_args(args))
    if status == 0:
        print(f"wrote {args.dst}")
    return status

"""`deepseek-vl-jax export SRC DST`: a Flax checkpoint (or a training output directory) -> an HF directory that
transformers loads with `from_pretrained`.

Writes what `save_pretrained` writes: safetensors with transformers' key names and `{"format": "pt"}` metadata
(one `model.safetensors`, or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` above
--max-shard-size), no `lm_head.weight` for tied embeddings (transformers omits it too), `config.json` and the
tokenizer/processor files. Leaves are read from Orbax a group at a time (partial restore), so memory stays near
the largest leaf. Atomic like `convert`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterator

import numpy as np

from deepseek_vl_jax import common, hf_mapping
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.conversion import atomic, fast_mapping, flax_checkpoint
from deepseek_vl_jax.conversion import safetensors_writer as sw
from deepseek_vl_jax.conversion.convert import DTYPES, handle_sigterm, report_errors

READ_GROUP_BYTES = 256 * 2**20  # leaves restored per Orbax call (bounded by this, or one leaf if larger)


def _groups(table: list[hf_mapping.Entry], nbytes: dict) -> Iterator[list[hf_mapping.Entry]]:
    group, size = [], 0
    for e in table:
        if group and size + nbytes[e.path] > READ_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(e)
        size += nbytes[e.path]
    if group:
        yield group


def export(src: str | os.PathLike, dst: str | os.PathLike, max_shard_size: int | str = "5GB",
           dtype: str | None = None, force: bool = False, step: int | None = None, progress: bool = True,
           merge=None) -> list[str]:
    """Export a Flax checkpoint directory / training output (latest step, or `step`) to an HF directory at `dst`.
    `merge`: a LoRA run's `lora.export.MergedView` (its adapters folded in, leaf by leaf). A quantized checkpoint
    (`convert --quantize`) is dequantized leaf by leaf: float weights (the scales' dtype) that keep the
    quantization's rounding error. Returns the weight files written."""
    source = flax_checkpoint.resolve(src, step)
    qconfig = quantized_config(source)
    dst = os.path.abspath(os.fspath(dst))
    atomic.check_destination(dst, force)
    sw.parse_size(max_shard_size)
    config_dict = flax_checkpoint.read_config_dict(source)
    config = ModelConfig.from_hf(config_dict)
    stored = flax_checkpoint.stored_leaves(source)
    sources = {}  # merged leaf -> the stored leaves it is made from
    if qconfig is not None and merge is None:  # a quantized checkpoint: dequantized, leaf by leaf
        from deepseek_vl_jax.quantization import checkpoint as quantized
        merge = quantized.dequantized_view(stored, flax_checkpoint.abstract(config), qconfig)
    if merge is not None:
        stored, sources = merge.shapes, merge.sources
    elif any(path[0] == "lora" for path in stored):
        raise ValueError(f"{source.params_dir} holds LoRA adapters; export with --merge (a plain HF checkpoint) "
                         "or --adapter (a PEFT adapter directory)")
    flax_checkpoint.check_tree(flax_checkpoint.template_shapes(config), {k: s for k, (s, _) in stored.items()},
                               f"checkpoint {source.params_dir}")
    target = np.dtype(common.to_dtype(dtype)) if dtype else None
    leaf_dtype = {k: target or d for k, (_, d) in stored.items()}
    table = hf_mapping.entries(_shape_tree(stored))
    specs = [sw.TensorSpec(k, e.hf_shape(), leaf_dtype[e.path]) for e in table for k in e.hf_keys]
    nbytes = {e.path: int(np.prod(e.shape, dtype=np.int64)) * stored[e.path][1].itemsize for e in table}
    dtypes = sorted({np.dtype(d).name for d in leaf_dtype.values()})

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True,
                   desc=f"export {os.path.basename(os.path.normpath(os.fspath(src)))}")

    def arrays():
        for group in _groups(table, nbytes):
            leaves = flax_checkpoint.read_leaves(
                source, [p for e in group for p in sources.get(e.path, [e.path])])
            for e in group:
                leaf = merge.build(e.path, leaves) if merge is not None else leaves.pop(e.path)
                for key, x in fast_mapping.hf_from_leaf(e, leaf, leaf_dtype[e.path]):
                    if bar is not None:
                        bar.update(x.nbytes)
                    yield key, x
                del leaf

    try:
        with atomic.staged_directory(dst, force) as tmp:
            files = sw.write_checkpoint(tmp, specs, arrays(), max_shard_size)
            cfg = dict(config_dict)
            if len(dtypes) == 1:
                cfg = flax_checkpoint.with_dtype(cfg, dtypes[0])
            cfg.setdefault("architectures", ["DeepseekVLHybridForConditionalGeneration" if config.is_hybrid
                                             else "DeepseekVLForConditionalGeneration"])
            with open(os.path.join(tmp, flax_checkpoint.CONFIG), "w") as f:
                json.dump(cfg, f, indent=2, sort_keys=True)
                f.write("\n")
            flax_checkpoint.copy_auxiliary_files(source.root, tmp, selective=source.kind == "training")
    finally:
        if bar is not None:
            bar.close()
    return files


def quantized_config(source):
    """The quantization settings a Flax checkpoint's marker records (None for a float one or a training output)."""
    if source.kind != "flax":
        return None
    from deepseek_vl_jax.quantization import checkpoint as quantized
    return quantized.stored_config(flax_checkpoint.read_marker(source.root))


def _shape_tree(stored: dict) -> dict:
    tree: dict = {}
    for path, (shape, _) in stored.items():
        hf_mapping.set_path(tree, path, _Shape(shape))
    return tree


class _Shape:
    """A leaf with only a shape (what `hf_mapping.entries` reads)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Flax checkpoint directory (from `convert`) or a training output directory "
                                    "(OUT with checkpoints/<step>/params; the latest step unless --step)")
    parser.add_argument("dst", help="output HF directory (must not exist unless --force)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: as stored)")
    parser.add_argument("--step", type=int, default=None, help="training step to export (default: latest)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DST (only after the new directory is complete)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge", action="store_true", help="LoRA run: fold the adapters into the base (plain HF dir)")
    lora.add_argument("--adapter", action="store_true",
                      help="LoRA run: write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")


def run(args: Any) -> int:
    handle_sigterm()
    if getattr(args, "adapter", False):
        from deepseek_vl_jax.lora.export import export_adapter
        status = report_errors(export_adapter, args.src, args.dst, step=args.step, force=args.force)
    elif getattr(args, "merge", False):
        from deepseek_vl_jax.lora.export import export_merged
        status = report_errors(export_merged, args.src, args.dst, step=args.step, force=args.force,
                               max_shard_size=args.max_shard_size, dtype=args.dtype, progress=args.progress)
    else:
        status = report_errors(export, args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                               force=args.force, step=args.step, progress=args.progress)
    if status == 0:
        lora = getattr(args, "adapter", False) or getattr(args, "merge", False)
        qconfig = None if lora else quantized_config(flax_checkpoint.resolve(args.src, args.step))
        note = "" if qconfig is None else \
            f" (dequantized from {qconfig.scheme.value}: float weights that keep its rounding error)"
        print(f"wrote {args.dst}{note}")
    return status

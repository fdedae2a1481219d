"""Streaming writer for HF safetensors checkpoints: single file or shards with `model.safetensors.index.json`.

The header of each file is computed from the tensors' names, shapes and dtypes before any data exists, then the
data is pulled from an iterator one tensor at a time, so memory stays at about one tensor. Sharding follows
transformers' `save_pretrained`: tensors are added to the current shard until the next one would exceed
`max_shard_size`; shards are named `model-00001-of-0000N.safetensors`; everything in one file is
`model.safetensors`. Files carry transformers' metadata `{"format": "pt"}`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Mapping

import numpy as np

from deepseek_vl_jax.safetensors_io import HF_METADATA, INDEX_FILE, SINGLE_FILE, CheckpointError, TensorSpec, write_file

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_checkpoint(directory: str, specs: list[TensorSpec], arrays: Iterable[tuple[str, np.ndarray]],
                     max_shard_size: int | str = "5GB",
                     metadata: Mapping[str, str] | None = HF_METADATA) -> list[str]:
    """Write an HF weights checkpoint into `directory`; `arrays` yields (name, array) in the order of `specs`.
    Returns the file names written (shards, then the index file if sharded)."""
    arrays = iter(arrays)
    shards = plan_shards(specs, parse_size(max_shard_size))
    if len(shards) == 1:
        write_file(os.path.join(directory, SINGLE_FILE), shards[0], arrays, metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_file(os.path.join(directory, name), shard, arrays, metadata)
    index = {
        "metadata": {"total_parameters": int(sum(int(np.prod(s.shape, dtype=np.int64)) for s in specs)),
                     "total_size": int(sum(s.nbytes for s in specs))},
        "weight_map": dict(sorted((s.name, name) for name, shard in zip(names, shards) for s in shard)),
    }
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return names + [INDEX_FILE]

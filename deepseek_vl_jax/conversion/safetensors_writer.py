"""Streaming writer for HF safetensors checkpoints: single file or shards with `model.safetensors.index.json`.

The header of each file is computed from the tensors' names, shapes and dtypes before any data exists, then the
data is pulled from an iterator one tensor at a time, so memory stays at about one tensor. Sharding follows
transformers' `save_pretrained`: tensors are added to the current shard until the next one would exceed
`max_shard_size`; shards are named `model-00001-of-0000N.safetensors`; everything in one file is
`model.safetensors`. Files carry transformers' metadata `{"format": "pt"}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Iterable, Iterator, Mapping

import numpy as np

from deepseek_vl_jax.safetensors_io import INDEX_FILE, NAMES, SINGLE_FILE, CheckpointError

HF_METADATA = {"format": "pt"}
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


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


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


def _header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header, offset = {}, 0
    for s in specs:
        dtype = np.dtype(s.dtype)
        if dtype not in NAMES:
            raise CheckpointError(f"cannot write tensor {s.name!r}: unsupported dtype {dtype}")
        header[s.name] = {"dtype": NAMES[dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def write_file(path: str, specs: list[TensorSpec], arrays: Iterator[tuple[str, np.ndarray]],
               metadata: Mapping[str, str] | None = HF_METADATA) -> None:
    """Write `specs` (in order) to one safetensors file, pulling each tensor's data from `arrays` (same order)."""
    blob = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            name, arr = next(arrays)
            arr = np.asarray(arr)
            if name != s.name or tuple(arr.shape) != tuple(s.shape) or arr.dtype != np.dtype(s.dtype):
                raise CheckpointError(f"internal error: expected {s.name} {s.shape} {np.dtype(s.dtype)}, got "
                                      f"{name} {arr.shape} {arr.dtype}")
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


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

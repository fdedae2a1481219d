"""Reading and writing the safetensors format with numpy, lazily and with clear errors.

Our own small reader (the format is an 8-byte header length, a JSON header, raw little-endian bytes) so that
bfloat16 works with numpy (via ml_dtypes), tensors are memory-mapped one at a time, and a truncated or corrupt
file is reported by name before any tensor is used.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_METADATA = {"format": "pt"}  # what transformers writes into every file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated or corrupt file, missing or unexpected tensor."""


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `get(name)` returns a read-only numpy view (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated or corrupt (header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes, shape needs {want}")
            if self.start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {self.start + end}, file has {size}")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        e = self.entries[name]
        begin, end = e["data_offsets"]
        arr = np.frombuffer(self._mmap, dtype=DTYPES[e["dtype"]], count=(end - begin) // DTYPES[e["dtype"]].itemsize,
                            offset=self.start + begin)
        return arr.reshape(e["shape"])


class CheckpointReader:
    """All tensors of an HF checkpoint directory: `model.safetensors`, or shards listed by the index file."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = str(directory)
        index = os.path.join(self.directory, INDEX_FILE)
        single = os.path.join(self.directory, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt index file ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(self.directory, f))]
            if missing:
                raise CheckpointError(f"{self.directory}: shard file(s) listed in {INDEX_FILE} are missing: {missing}")
        elif os.path.exists(single):
            files, weight_map = [SINGLE_FILE], None
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.files = {name: SafetensorsFile(os.path.join(self.directory, name)) for name in files}
        self.where: dict[str, SafetensorsFile] = {}
        for name, f in self.files.items():
            for key in f.keys():
                self.where[key] = f
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if k not in self.files[f].entries]
            if absent:
                raise CheckpointError(f"{self.directory}: tensors listed in the index are not in their shard: "
                                      f"{absent[:5]}{'...' if len(absent) > 5 else ''}")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.where[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        if key not in self.where:
            raise CheckpointError(f"{self.directory}: missing tensor {key!r}")
        return self.where[key].get(key)

    @property
    def nbytes(self) -> int:
        return sum(os.path.getsize(f.path) for f in self.files.values())


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


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


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (name -> array, in the given order) to one safetensors file (a convenience over `write_file`
    for tensors already in memory). The caller handles atomicity (write into a temporary directory)."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    specs = [TensorSpec(name, tuple(np.shape(arr)), np.asarray(arr).dtype) for name, arr in items]
    write_file(str(path), specs, iter(items), metadata)

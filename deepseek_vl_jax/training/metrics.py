"""Where metrics go: `metrics.jsonl` (one JSON object per line), TensorBoard event files and a progress bar.
Only process 0 writes.

The TensorBoard writer is dependency-free: TFRecord framing (length, masked CRC-32C, payload, masked CRC-32C)
around hand-encoded `Event` protos holding `Summary.Value.simple_value` scalars — all TensorBoard needs to plot.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping

# ------------------------------------------------------------------------------------------ TensorBoard events


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """An `Event` proto: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def frame_record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", _masked_crc(header)) + payload + struct.pack("<I", _masked_crc(payload))


class EventWriter:
    """Appends scalar summaries to `directory/events.out.tfevents.<time>.<host>`."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(directory, name)
        self._f = open(self.path, "ab")
        self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if values:
            self._f.write(frame_record(encode_event(time.time(), step, values)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """Decode the (step, scalars) records of an event file written by `EventWriter` (checks every CRC)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
            raise ValueError("corrupt record header")
        payload = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != _masked_crc(payload):
            raise ValueError("corrupt record payload")
        pos += 16 + length
        step, scalars = _decode_event(payload)
        if scalars:
            out.append((step, scalars))
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        byte = b[i]
        n |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return n, i
        shift += 7


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(b, i)
        elif wire == 1:
            value, i = b[i:i + 8], i + 8
        elif wire == 5:
            value, i = b[i:i + 4], i + 4
        else:
            length, i = _read_varint(b, i)
            value, i = b[i:i + length], i + length
        yield number, value


def _decode_event(b: bytes) -> tuple[int, dict[str, float]]:
    step, scalars = 0, {}
    for number, value in _fields(b):
        if number == 2:
            step = value
        elif number == 5:
            for _, v in _fields(value):
                parts = dict(_fields(v))
                scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
    return step, scalars


# ------------------------------------------------------------------------------------------------ the logger
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


class MetricsLogger:
    """Writes each step's metrics to metrics.jsonl, TensorBoard and the progress bar (process 0 only).

    On resume from step `start_step`, lines of later steps (written before the interruption, about to be redone)
    are dropped so the file holds each step once."""

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.eval_path = os.path.join(out_dir, EVAL_FILE)
        self._tb = self._bar = None
        if not enabled:
            return
        self._files = {}
        for name, path in (("train", self.path), ("eval", self.eval_path)):
            _truncate(path, start_step)
            self._files[name] = open(path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = EventWriter(os.path.join(out_dir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
        """One line `{"step": step, **metrics}` in metrics.jsonl (kind "train") or eval.jsonl (kind "eval");
        TensorBoard tags `train/<name>` and `eval/<name>`."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._files[kind].write(json.dumps(record) + "\n")
        self._files[kind].flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"{kind}/{k}": v for k, v in record.items() if k != "step"})
        if self._bar is not None and kind == "train":
            self._bar.n = int(step)
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  tok_s=f"{record.get('tokens_per_s', 0.0):.0f}", refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        for f in self._files.values():
            f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _truncate(path: str, start_step: int) -> None:
    """Keep only the lines of steps <= start_step (the rest are about to be redone after a resume)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln).get("step", 0) <= start_step:
                keep.append(ln)
        except json.JSONDecodeError:
            pass  # a line cut short by a kill
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v

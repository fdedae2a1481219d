"""The training data pipeline: a JSONL of chats -> checked rows -> a deterministic, host-sharded grain pipeline of
padded numpy batches.

Row schema (one JSON object per line):

    {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "images/cat.png"},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
     "id": "optional, ignored"}

Image paths are relative to the JSONL file's directory and must stay inside it; the last message must be the
assistant's. Labels come from the processor (`training_example`): only assistant tokens (+ the final eos) are
learned.

Checks happen in two places, both reporting the 1-based line number: cheap ones when the file is read (JSON,
schema, last turn, image paths exist and stay inside the directory, at most `max_images_per_row` images), and the
rest (unreadable image, too many tokens) when the row is processed. `bad_rows="skip"` leaves a bad row out (a
processed bad row becomes an all-ignored padding row, so batches keep their shape and hosts stay in step);
`"fail"` stops the run.

Order: the rows are shuffled per epoch from `data.seed` and cut into global batches of `batch_size` rows. Each host
takes only the rows its devices hold (`local_rows`) and only loads those images. The grain iterator's state (one
index) is saved with every checkpoint, so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Sequence

import grain
import numpy as np

from deepseek_vl_jax.common import IGNORE_INDEX
from deepseek_vl_jax.processing import ProcessorError
from deepseek_vl_jax.training import formats
from deepseek_vl_jax.training.config import BadRows, DataConfig

log = logging.getLogger(__name__)


class BadRowError(ValueError):
    """A data row that cannot be trained on; `line` is its 1-based line number in the JSONL file."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


@dataclasses.dataclass(frozen=True)
class Row:
    line: int
    messages: list  # the chat, image paths made absolute


@dataclasses.dataclass
class Rows:
    path: str
    rows: list[Row]
    bad: list[BadRowError]


def _check_messages(messages, directory: str, max_images: int) -> list:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    out, images = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f'message {i} must be an object with "role" (string) and "content"')
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"message {i}: content must be a string or a list of items")
        items = []
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
                raise ValueError(f'message {i}: content items must be {{"type": "text"|"image", ...}}, got {item!r}')
            if item["type"] == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f'message {i}: a text item needs a "text" string')
                items.append({"type": "text", "text": item["text"]})
                continue
            rel = item.get("image", item.get("path"))
            if not isinstance(rel, str) or not rel:
                raise ValueError(f'message {i}: an image item needs an "image" path relative to the data file')
            full = os.path.realpath(os.path.join(directory, rel))
            if os.path.commonpath([full, directory]) != directory:
                raise ValueError(f"image path {rel!r} is outside the data directory {directory}")
            if not os.path.isfile(full):
                raise ValueError(f"image {rel!r} not found ({full})")
            images += 1
            items.append({"type": "image", "image": full})
        out.append({"role": m["role"], "content": items})
    if out[-1]["role"].lower() != "assistant":
        raise ValueError(f"no assistant turn at the end (last role is {out[-1]['role']!r})")
    if images > max_images:
        raise ValueError(f"{images} images, more than data.max_images_per_row={max_images}")
    return out


def read_rows(path: str | os.PathLike, max_images_per_row: int, bad_rows: BadRows) -> Rows:
    """Read and check every line. Bad rows are logged with their line number; with `bad_rows="fail"` the first
    one (after reporting all of them) raises `BadRowError`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.realpath(path))
    rows, bad = [], []
    for n, record in formats.records(path):  # JSONL, or a JSON array (LLaVA)
        try:
            if isinstance(record, ValueError):
                raise record
            record = formats.to_native(record)  # LLaVA / OpenAI-messages rows -> native rows
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError('a row must be a JSON object with a "messages" list (or LLaVA "conversations")')
            rows.append(Row(n, _check_messages(record["messages"], directory, max_images_per_row)))
        except ValueError as e:
            bad.append(BadRowError(path, n, str(e)))
    for e in bad:
        log.warning("bad data row %s", e)
    if bad and BadRows(bad_rows) == BadRows.FAIL:
        raise bad[0]
    if not rows:
        raise BadRowError(path, 0, "no usable rows in the file")
    return Rows(path, rows, bad)


def default_pad_id(processor) -> int:
    for i in (processor.pad_token_id, processor.eos_token_id):
        if i is not None:
            return int(i)
    return 0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What a batch looks like: [accum, rows, length] tokens and `max_images` image slots per row."""

    accum: int
    rows: int  # rows per micro-batch on this host
    max_images: int
    image_shape: tuple[int, int, int]
    high_res_shape: tuple[int, int, int] | None
    buckets: tuple[int, ...]
    pad_id: int


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} is longer than the largest bucket {buckets[-1]}")


def collate(examples: Sequence[dict | None], shapes: Shapes, length: int | None = None) -> dict[str, np.ndarray]:
    """Examples (None = padding row) -> numpy arrays: input_ids/attention_mask/labels [A, b, L] (right-padded to
    the bucket), pixel_values [A, b * M, 3, S, S] (+ high_res_pixel_values): row r's images in slots r*M.."""
    a, b, m = shapes.accum, shapes.rows, shapes.max_images
    if len(examples) != a * b:
        raise ValueError(f"expected {a * b} examples, got {len(examples)}")
    longest = max((len(e["input_ids"]) for e in examples if e is not None), default=1)
    length = length or bucket_for(longest, shapes.buckets)
    ids = np.full((a, b, length), shapes.pad_id, np.int32)
    mask = np.zeros((a, b, length), np.int32)
    labels = np.full((a, b, length), IGNORE_INDEX, np.int32)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if m:
        out["pixel_values"] = np.zeros((a, b * m, *shapes.image_shape), np.float32)
        if shapes.high_res_shape is not None:
            out["high_res_pixel_values"] = np.zeros((a, b * m, *shapes.high_res_shape), np.float32)
    for k, e in enumerate(examples):
        i, r = divmod(k, b)
        if e is None:
            mask[i, r, 0] = 1  # one attended token keeps the row's attention well defined; nothing is learned
            continue
        n = len(e["input_ids"])
        ids[i, r, :n], mask[i, r, :n], labels[i, r, :n] = e["input_ids"], e["attention_mask"], e["labels"]
        for key in ("pixel_values", "high_res_pixel_values"):
            if key in e and len(e[key]):
                out[key][i, r * m:r * m + len(e[key])] = e[key]
    return out


def pad_length(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad the token arrays of a collated batch to `length` (hosts agree on one length per step)."""
    t = batch["input_ids"].shape[-1]
    if t == length:
        return batch
    out = dict(batch)
    extra = [(0, 0)] * (batch["input_ids"].ndim - 1) + [(0, length - t)]
    out["input_ids"] = np.pad(batch["input_ids"], extra, constant_values=pad_id)
    out["attention_mask"] = np.pad(batch["attention_mask"], extra)
    out["labels"] = np.pad(batch["labels"], extra, constant_values=IGNORE_INDEX)
    return out


class ExampleLoader:
    """Row -> processed example (or None for a skipped bad row) with the processor; thread-safe."""

    def __init__(self, processor, path: str, data: DataConfig):
        self.processor, self.path, self.data = processor, path, data

    def __call__(self, row: Row | None):
        if row is None:
            return None
        try:
            return self.processor.training_example(row.messages, max_length=self.data.max_length)
        except ProcessorError as e:
            error = BadRowError(self.path, row.line, f"{type(e).__name__}: {e}")
            if self.data.bad_rows == BadRows.FAIL:
                raise error from e
            log.warning("skipping bad data row %s", error)
            return error


def _load_batch(rows: Sequence[Row | None], loader: ExampleLoader, shapes: Shapes) -> dict:
    examples = [loader(r) for r in rows]
    bad = [e for e in examples if isinstance(e, BadRowError)]
    batch = collate([None if isinstance(e, BadRowError) else e for e in examples], shapes)
    batch["skipped_lines"] = np.asarray([e.line for e in bad], np.int64)
    return batch


def _host_rows(global_rows: Sequence[Row | None], accum: int, local: slice) -> list:
    """This host's rows of one step: micro-batch i is global rows [i*Bm, (i+1)*Bm); the host holds `local` of each."""
    micro = len(global_rows) // accum
    return [r for i in range(accum) for r in global_rows[i * micro:(i + 1) * micro][local]]


def _pad_rows(rows: Sequence[Row], size: int) -> list:
    return list(rows) + [None] * (size - len(rows))


def train_dataset(rows: Rows, loader: ExampleLoader, shapes: Shapes, data: DataConfig, local: slice) -> grain.MapDataset:
    """Infinite dataset of this host's batches, one per optimizer step."""
    ds = grain.MapDataset.source(rows.rows)
    if data.shuffle:
        ds = ds.shuffle(seed=data.seed)  # followed by repeat: a new order every epoch
    ds = ds.repeat(None).batch(data.batch_size, batch_fn=list)
    ds = ds.map(functools.partial(_host_rows, accum=shapes.accum, local=local))
    return ds.map(functools.partial(_load_batch, loader=loader, shapes=shapes))


def eval_dataset(rows: Rows, loader: ExampleLoader, shapes: Shapes, global_rows: int, local: slice) -> grain.MapDataset:
    """One pass over the held-out rows in file order, the last batch padded with ignored rows."""
    ds = grain.MapDataset.source(rows.rows).batch(global_rows, batch_fn=functools.partial(_pad_rows, size=global_rows))
    ds = ds.map(lambda batch: list(batch)[local])
    return ds.map(functools.partial(_load_batch, loader=loader, shapes=shapes))


def iterate(ds: grain.MapDataset, data: DataConfig):
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=data.num_threads,
                                                      prefetch_buffer_size=data.prefetch)))


"""The engine's two content-keyed caches, both LRU and bounded by bytes.

- `ImageFeatureCache`: image features [P, D] (host numpy) keyed by a hash of the image's pixel values (both towers'
  for the hybrid model), so an image sent again (the next turn of a chat) is not encoded again.
- `PrefixCache`: KV blocks (the prompt's prefill chunks, see `boundaries`), keyed like vLLM's prefix cache by a
  chain of hashes: block j's key hashes block j-1's key, its token ids and the content hash of every image whose
  token run overlaps it. Two
  prompts with the same text but different images therefore never share a block past the first image. A hit is only
  used up to a block boundary that does not fall inside an image's token run, and never up to the prompt's last
  token (its logits are needed).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Callable, Sequence

import jax
import numpy as np


def pixel_hash(*arrays: np.ndarray | None) -> str:
    """Content hash of an image's pixel arrays (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


class _LRU:
    """OrderedDict with a byte budget: inserting past it evicts the least recently used entries."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int]):
        self.max_bytes, self.size_of = int(max_bytes), size_of
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.bytes = 0

    def get(self, key):
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self.size_of(self.entries.pop(key))
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= self.size_of(old)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries


class ImageFeatureCache(_LRU):
    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, lambda a: a.nbytes)


def _tree_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def image_runs(ids: np.ndarray, image_token_id: int, tokens_per_image: int) -> list[tuple[int, int]]:
    """[start, end) of each image's token run in ids [n] (consecutive images are split every P tokens)."""
    where = np.flatnonzero(ids == image_token_id)
    if len(where) % tokens_per_image:
        raise ValueError(f"{len(where)} image tokens is not a multiple of {tokens_per_image} tokens per image")
    starts = where[::tokens_per_image]
    return [(int(s), int(s) + tokens_per_image) for s in starts]


def boundaries(n: int, runs: Sequence[tuple[int, int]], chunk: int) -> list[int]:
    """Where the prompt's prefill chunks start: 0, then each next one C tokens on or at the end of an image's token
    run, whichever comes first, until past the prompt (the last chunk may be partly empty). The boundaries depend only
    on the content before them, so two prompts sharing a prefix split it identically, and a prefix can end right
    after an image."""
    out, b = [0], 0
    while b < n:
        nxt = b + chunk
        for _, e in runs:
            if b < e < nxt:
                nxt = e
                break
        out.append(nxt)
        b = nxt
    return out


def block_keys(ids: np.ndarray, image_hashes: Sequence[str], runs: Sequence[tuple[int, int]],
               bounds: Sequence[int]) -> list[str]:
    """Chained keys of the prompt's complete blocks [bounds[j], bounds[j + 1]) (those ending within ids [n]): key j
    covers tokens [0, bounds[j + 1]) and the images overlapping them."""
    keys, parent = [], b""
    for j in range(len(bounds) - 1):
        lo, hi = bounds[j], bounds[j + 1]
        if hi > len(ids):
            break
        h = hashlib.sha256(parent)
        h.update(f"{lo}:{hi}|".encode())
        h.update(np.ascontiguousarray(ids[lo:hi], np.int64).tobytes())
        for (s, e), image in zip(runs, image_hashes):
            if s < hi and e > lo:
                h.update(f"|{s}:{image}".encode())
        parent = h.digest()
        keys.append(parent.hex())
    return keys


def usable_boundary(boundary: int, runs: Sequence[tuple[int, int]]) -> bool:
    """A prefix of `boundary` tokens may be reused only if it does not end inside an image's token run."""
    return not any(s < boundary < e for s, e in runs)


class PrefixCache(_LRU):
    """Chained block key -> KV block (device arrays of C slots, see `programs.Programs.save_block`)."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, _tree_bytes)

    def longest_hit(self, keys: Sequence[str], bounds: Sequence[int], n_tokens: int,
                    runs: Sequence[tuple[int, int]]) -> int:
        """How many leading blocks of a prompt of n_tokens (block keys `keys`, boundaries `bounds`) to restore."""
        best = 0
        for j, key in enumerate(keys):
            boundary = bounds[j + 1]
            if key not in self.entries or boundary >= n_tokens:
                break
            if usable_boundary(boundary, runs):
                best = j + 1
        return best

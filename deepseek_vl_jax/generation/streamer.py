"""Streamers: receive each step's generated tokens [B] from `generate` (`put`), then `end()` once."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np


class TokenCollector:
    """Keeps every step's tokens (tests, or callers that want the steps as they come)."""

    def __init__(self):
        self.steps: list[np.ndarray] = []
        self.ended = False

    def put(self, tokens) -> None:
        self.steps.append(np.asarray(tokens).copy())

    def end(self) -> None:
        self.ended = True


class TextStreamer:
    """Prints the text of a single-row generation as it is produced, using the processor's incremental decoder
    (text is held back while a multi-byte character is incomplete). Stops printing at an end token.

    processor: a `DeepseekVLProcessor` (anything with `incremental_decoder(skip_special_tokens)`).
    stop_ids: token ids that end the stream (e.g. the eos ids); they and everything after are not printed.
    """

    def __init__(self, processor: Any, skip_special_tokens: bool = True, stop_ids=(), file: TextIO | None = None):
        self._decoder = processor.incremental_decoder(skip_special_tokens=skip_special_tokens)
        self.stop_ids = {int(i) for i in stop_ids}
        self.file = file if file is not None else sys.stdout
        self.text = ""
        self._stopped = False

    def _write(self, text: str) -> None:
        if text:
            self.text += text
            self.file.write(text)
            self.file.flush()

    def put(self, tokens) -> None:
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.shape[0] != 1:
            raise ValueError(f"TextStreamer prints one row; got a batch of {tokens.shape[0]}")
        if self._stopped:
            return
        token = int(tokens[0])
        if token in self.stop_ids:
            self._stopped = True
            return
        self._write(self._decoder.add(token))

    def end(self) -> None:
        self._write(self._decoder.flush())
        self.file.write("\n")
        self.file.flush()

"""What a client hands the engine and gets back: a processed chat (`Prompt`), its sampling and stopping `Options`,
and the `Event`s of its answer."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import numpy as np

from deepseek_vl_jax.serving import turns


@dataclasses.dataclass(frozen=True)
class Options:
    """Per-request sampling and stopping. temperature 0 = greedy; top_k 0 = off; max_tokens None = up to the end of
    the cache; seed None = a random one."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


@dataclasses.dataclass
class Prompt:
    """A processed chat: ids [n] and per image (pixel_values [3, H, W], high_res [3, Hh, Wh] or None).
    next_turn: answer text -> the ids the chat's next prompt starts with (`turns.next_turn_ids`); with it, a
    request's end puts the answer's KV into the prefix cache."""

    ids: np.ndarray
    images: list[tuple[np.ndarray, np.ndarray | None]] = dataclasses.field(default_factory=list)
    next_turn: Callable[[str], np.ndarray] | None = None

    @classmethod
    def from_chat(cls, processor, messages: list[dict]) -> "Prompt":
        """Run the processor on a chat (with the generation prompt) and remember how its next turn begins."""
        prompt = cls.from_batch(processor(messages, add_generation_prompt=True))
        prompt.next_turn = functools.partial(turns.next_turn_ids, processor, messages)
        return prompt

    @classmethod
    def from_batch(cls, batch: dict) -> "Prompt":
        """From a processor output for one chat (attention mask all ones)."""
        ids = np.asarray(batch["input_ids"])[0]
        mask = np.asarray(batch.get("attention_mask", np.ones((1, len(ids)))))[0].astype(bool)
        pix, high = batch.get("pixel_values"), batch.get("high_res_pixel_values")
        n = 0 if pix is None else len(pix)
        return cls(ids[mask].astype(np.int32), [(pix[i], None if high is None else high[i]) for i in range(n)])


@dataclasses.dataclass
class Event:
    """What one step produced for one choice: new text, the new tokens (with log-probabilities when asked), and on
    the last event the finish reason ('stop' or 'length'; 'cancelled' never reaches a client)."""

    choice: int
    text: str
    tokens: list[int]
    logprobs: list[dict] | None = None
    finish_reason: str | None = None

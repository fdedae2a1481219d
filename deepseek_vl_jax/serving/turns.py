"""The next turn of a chat: the token ids its prompt will start with once the answer is known, so the engine can
put the answer's KV into the prefix cache when a request ends (the next turn then prefills only its new message).

The next prompt renders the answer through the chat template (a separator before it, an end token after it) and
tokenizes that text afresh, so its ids are not the generated ids; `next_turn_ids` predicts what the next request's
processor call will produce, and the prefix cache's content keys decide whether it really matches.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def next_turn_ids(processor, messages: Sequence[dict], answer: str) -> np.ndarray:
    """ids [n] that any next prompt of the chat `messages` + the assistant's `answer` starts with, as the processor
    tokenizes it (image placeholders expanded, BOS as `process_prompts` adds it).

    A template may render the last assistant message differently from one that a user message follows (without
    its end token), so this renders the chat followed by two different user messages and keeps their common text;
    its last token is dropped, as the next message's first characters may merge into it."""
    chat = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    a, b = (processor.render([*chat, {"role": "user", "content": [{"type": "text", "text": t}]}],
                             add_generation_prompt=True) for t in ("a", "b"))
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    text = a[:n]
    bos = processor.bos_token
    special = not (bos is not None and text.startswith(bos))
    encoded = processor.tokenizer.encode_batch([processor.expand_image_tokens(text)], add_special_tokens=special)
    return np.asarray(encoded[0].ids[:-1], np.int32)


def answer_blocks(prompt_ids: np.ndarray, next_ids: np.ndarray, bounds: Sequence[int],
                  image_token_id: int) -> range:
    """Which blocks [bounds[j], bounds[j + 1]) of `next_ids` to compute and cache at a request's end: from the block
    holding the prompt's last token through the last complete one. Empty when the next prompt does not start with
    this one or would add image tokens (the next request brings its images itself)."""
    n = len(prompt_ids)
    if len(next_ids) <= n or not np.array_equal(next_ids[:n], prompt_ids) or (next_ids[n:] == image_token_id).any():
        return range(0)
    first = next(j for j in range(len(bounds) - 1) if bounds[j + 1] > n)
    last = max((j + 1 for j in range(len(bounds) - 1) if bounds[j + 1] <= len(next_ids)), default=0)
    return range(first, max(first, last))

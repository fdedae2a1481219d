"""`pipeline("image-text-to-text", model=...)`: transformers' pipeline interface over `generate`.

    pipe = deepseek_vl_jax.pipeline("image-text-to-text", model="path/to/deepseek-vl-1.3b-chat")
    pipe(text=chat, max_new_tokens=64, return_full_text=False)    # [{"input_text": chat, "generated_text": "..."}]
    pipe(text=[chat_a, chat_b], max_new_tokens=64)                  # one list per chat, generated as one batch

A chat is a list of {"role", "content"} messages whose content items are {"type": "image", "image" | "url" |
"path": ...} or {"type": "text", "text": ...}. With return_full_text (the default, as transformers) a chat's
`generated_text` is the chat plus the assistant's message; a plain prompt string gets the prompt plus the answer.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

TASK = "image-text-to-text"


class ImageTextToTextPipeline:
    """A loaded model and processor; calling it answers chats (see the module docstring)."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor

    def __call__(self, text: Any = None, images: Any = None, *, max_new_tokens: int = 256,
                 return_full_text: bool = True, generate_kwargs: dict | None = None, **kwargs) -> list:
        from deepseek_vl_jax.generation import generate
        from deepseek_vl_jax.processing import chat_template as ct

        if text is None and _is_chat_like(images):  # transformers also takes the chats as the first argument
            text, images = images, None
        if text is None:
            raise ValueError("give the chat(s) as text=[{'role': 'user', 'content': [...]}, ...] (or a prompt string)")
        kwargs = {**(generate_kwargs or {}), **kwargs}
        batched = isinstance(text, (list, tuple)) and bool(text) and (
            isinstance(text[0], str) or ct.is_batched(text))
        items = list(text) if batched else [text]
        is_chat = [not isinstance(t, str) for t in items]
        if any(is_chat) and not all(is_chat):
            raise ValueError("give either chats or prompt strings, not both in one call")
        if all(is_chat):
            if images is not None:
                raise ValueError("with chats, put the images inside the messages ({'type': 'image', 'image': ...})")
            batch = self.processor(items, add_generation_prompt=True, padding_side="left")
        else:
            per_prompt = images if batched else ([] if images is None else [images])
            if per_prompt is None:
                per_prompt = [[] for _ in items]
            batch = self.processor.process_prompts(items, [_as_list(x) for x in per_prompt], padding_side="left")
        tokens = generate(self.model, batch, max_new_tokens=max_new_tokens, **kwargs)
        eos = _eos_ids(kwargs.get("eos_token_id"), self.model.config.text.eos_token_id)
        n = len(tokens) // len(items)  # num_return_sequences
        out = []
        for i, item in enumerate(items):
            answers = []
            for row in tokens[i * n:(i + 1) * n]:
                ends = np.flatnonzero(np.isin(row, eos))
                answer = self.processor.decode(row[:ends[0]] if len(ends) else row, skip_special_tokens=True)
                if return_full_text:
                    full = (list(item) + [{"role": "assistant", "content": answer}] if is_chat[i]
                            else item + answer)
                    answers.append({"input_text": item, "generated_text": full})
                else:
                    answers.append({"input_text": item, "generated_text": answer})
            out.append(answers)
        return out if batched else out[0]


def _is_chat_like(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and (isinstance(x[0], dict) or (
        isinstance(x[0], (list, tuple)) and bool(x[0]) and isinstance(x[0][0], dict)))


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def _eos_ids(given, config_eos) -> list[int]:
    from deepseek_vl_jax.generation.inputs import resolve_eos

    return list(resolve_eos(given, config_eos))


def pipeline(task: str = TASK, model: Any = None, processor: Any = None, dtype: str = "float32",
             **load_kwargs) -> ImageTextToTextPipeline:
    """transformers' `pipeline(task="image-text-to-text", model=...)`. model: a checkpoint directory (HF or a
    converted Flax checkpoint, loaded with `load_pretrained(model, dtype, **load_kwargs)`) or a loaded `Model`;
    processor: a directory or a processor (default: the model directory's)."""
    from deepseek_vl_jax import load_pretrained
    from deepseek_vl_jax.processing import load_processor

    if task != TASK:
        raise ValueError(f"unsupported task {task!r}; this library provides {TASK!r}")
    if model is None:
        raise ValueError("give model=DIRECTORY (an HF or converted checkpoint) or a loaded Model")
    directory = None
    if isinstance(model, (str, os.PathLike)):
        directory = os.fspath(model)
        if not os.path.isdir(directory):
            raise ValueError(f"model directory {directory!r} does not exist (this library never downloads)")
        model = load_pretrained(directory, dtype=dtype, progress=False, **load_kwargs)
    if processor is None:
        if directory is None:
            raise ValueError("with a loaded Model, give processor= (a directory or a loaded processor)")
        processor = directory
    if isinstance(processor, (str, os.PathLike)):
        processor = load_processor(processor)
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(f"the processor's image token id {processor.image_token_id} differs from the model's "
                         f"{model.config.image_token_id}")
    return ImageTextToTextPipeline(model, processor)

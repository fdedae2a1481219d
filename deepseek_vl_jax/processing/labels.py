"""Training examples: inputs plus labels where only the assistant's output is learned.

Rule (decided on the rendered template, aligned on token boundaries):

* The chat is rendered once, without a generation prompt, and tokenised exactly as the processor tokenises prompts
  (image placeholders expanded, BOS from the post-processor), so ``input_ids`` equal what inference would see.
* For every assistant message ``i`` (multi-turn: *all* assistant turns are learned) its span in the rendered text
  runs from the end of ``render(messages[:i], add_generation_prompt=True)`` — the prompt the model sees at inference,
  ending in ``"Assistant:"`` — to the end of ``render(messages[:i+1])``. So the span is exactly what the model has to
  generate after the generation prompt: the separating space plus the message text (the DeepSeek template emits
  ``"Assistant: " + text``).
* The end-of-sentence token the template renders right after a non-final assistant turn is learned too. The template
  renders nothing after the *final* message, so an EOS token id is appended to the sequence and learned, so that the
  model learns to stop (generation stops on EOS).
* A token is learned iff its character span overlaps an assistant span (the same rule as transformers'
  ``assistant_masks``); image tokens are never learned. Everything else (system prompt, user turns, role headers,
  BOS, images) has label -100.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import chat_template as ct
from .errors import ProcessorError, PromptTooLongError, UnsupportedContentError

IGNORE_INDEX = -100


def assistant_char_spans(processor, messages: list[dict], template_kwargs: dict) -> tuple[str, list[tuple[int, int]]]:
    """Rendered chat and the [start, end) character spans of what each assistant turn generates (incl. its EOS)."""
    full = processor._render(messages, False, template_kwargs)
    spans = []
    for i, message in enumerate(messages):
        if str(message["role"]).lower() != "assistant":
            continue
        before = processor._render(messages[:i], True, template_kwargs)
        through = processor._render(messages[: i + 1], False, template_kwargs)
        if not (full.startswith(before) and full.startswith(through) and len(through) >= len(before)):
            raise ProcessorError(
                f"cannot align assistant message {i}: the chat template does not render conversations prefix-stably"
            )
        end = len(through)
        eos = processor.eos_token
        if eos is not None and full.startswith(eos, end):
            end += len(eos)
        spans.append((len(before), end))
    return full, spans


def build_training_example(processor, chat: Any, max_length: int | None = None, **template_kwargs) -> dict:
    """``input_ids``, ``attention_mask``, ``labels`` (1-D int32) and ``pixel_values`` (+ ``high_res_pixel_values``)
    for one chat that ends with an assistant turn."""
    messages, images = ct.normalize_chat(chat)
    if str(messages[-1]["role"]).lower() != "assistant":
        raise UnsupportedContentError(
            f"a training chat must end with an assistant message, the last one has role {messages[-1]['role']!r}"
        )
    full, spans = assistant_char_spans(processor, messages, template_kwargs)
    placeholders = full.count(processor.image_token)
    if placeholders != len(images):
        from .errors import ImageCountError

        raise ImageCountError(
            f"the prompt contains {placeholders} image placeholder(s) {processor.image_token!r} "
            f"but {len(images)} image(s) were given"
        )

    def expanded_len(text: str) -> int:
        return len(text) + text.count(processor.image_token) * len(processor.image_token) * (
            processor.num_image_tokens - 1
        )

    spans = [(expanded_len(full[:s]), expanded_len(full[:e])) for s, e in spans]
    text = processor.expand_image_tokens(full)
    add_special = not (processor.bos_token is not None and full.startswith(processor.bos_token))
    enc = processor.tokenizer.encode(text, add_special_tokens=add_special)
    ids = list(enc.ids)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (s, e) in enumerate(enc.offsets):
        if e > s and any(s < span_end and e > span_start for span_start, span_end in spans):
            if ids[k] != processor.image_token_id:
                labels[k] = ids[k]
    if processor.eos_token_id is not None:
        ids.append(processor.eos_token_id)
        labels.append(processor.eos_token_id)
    if max_length is not None and len(ids) > max_length:
        raise PromptTooLongError(
            f"training example has {len(ids)} tokens, more than max_length={max_length} "
            f"(each image counts {processor.num_image_tokens} tokens)"
        )
    out = {
        "input_ids": np.asarray(ids, dtype=np.int32),
        "attention_mask": np.ones(len(ids), dtype=np.int32),
        "labels": np.asarray(labels, dtype=np.int32),
    }
    if images:
        out.update(processor.image_processor(images))
    return out

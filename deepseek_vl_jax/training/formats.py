"""The data formats fine-tuning sets usually come in, mapped to the native chat rows (`training/data.py`):

LLaVA JSON (a JSON array, or JSONL), `<image>` marking where each image goes (at the start of the first human
turn when no turn says where):

    {"id": "1", "image": "images/cat.png",            # or "images": [...], or no image (text-only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}

OpenAI messages JSONL (`image_url` parts; a relative path or a `file://` URL, as with the native rows):

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/cat.png"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

Labels are then the native ones: only assistant turns are learned. Errors keep the 1-based line number (for a JSON
array: the line its element starts on).
"""

from __future__ import annotations

import json
from typing import Iterator

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def records(path: str) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON object or a ValueError) for every row of a JSONL file or a JSON array file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, ValueError(f"not valid JSON ({e})")
        return
    decoder, i = json.JSONDecoder(), start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield line, ValueError(f"not valid JSON ({e}); the rest of the array is unreadable")
            return
        yield line, obj


def _llava(record: dict) -> dict:
    images = record.get("images", record.get("image"))
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise ValueError('"image" must be a path (or "images" a list of paths)')
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError('"conversations" must be a non-empty list of {"from", "value"} objects')
    placed = sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in turns if isinstance(t, dict))
    if placed not in (0, len(images)):
        raise ValueError(f"{placed} {IMAGE_PLACEHOLDER} placeholder(s) for {len(images)} image(s)")
    queue, messages = list(images), []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in LLAVA_ROLES:
            raise ValueError(f'turn {i} must be {{"from": "human"|"gpt"|"system", "value": "..."}}')
        role, value = LLAVA_ROLES[t["from"]], t["value"]
        if not placed and queue and role == "user":
            value = IMAGE_PLACEHOLDER * len(queue) + "\n" + value
        content = []
        for j, part in enumerate(value.split(IMAGE_PLACEHOLDER)):
            if j:
                content.append({"type": "image", "image": queue.pop(0)})
            part = part.strip("\n") if j or len(content) else part
            if part.strip():
                content.append({"type": "text", "text": part})
        messages.append({"role": role, "content": content})
    if queue:
        raise ValueError("the images come after the last human turn")
    return {"messages": messages}


def _openai_item(item):
    if isinstance(item, dict) and item.get("type") == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise ValueError('an image_url part needs {"image_url": {"url": "path"}}')
        if url.startswith("file://"):
            url = url[len("file://"):]
        elif "://" in url or url.startswith("data:"):
            raise ValueError(f"image_url {url[:40]!r}: only local paths (relative to the data file) are read; "
                             "download or decode the images first")
        return {"type": "image", "image": url}
    return item


def to_native(record):
    """A row of any supported format -> the native {"messages": [...]} form (native rows are returned as they are)."""
    if isinstance(record, dict) and "conversations" in record and "messages" not in record:
        return _llava(record)
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = []
        for m in record["messages"]:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                m = {**m, "content": [_openai_item(x) for x in m["content"]]}
            messages.append(m)
        return {**record, "messages": messages}
    return record

"""Chat-template rendering identical to transformers' `render_jinja_template` (utils/chat_template_utils.py).

Same sandbox (`ImmutableSandboxedEnvironment`, ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension),
same helpers (``raise_exception``, ``strftime_now``, ``tojson`` with ``ensure_ascii=False`` and the indent/separators/
sort_keys options, a limited ``dict`` and an underscore-safe ``namespace``), and the template only ever sees plain
JSON-like data: images and other rich objects become inert ``"<TypeName>"`` strings, as in transformers.

Conversations are normalised before rendering (see `normalize_chat`).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UnsupportedContentError

# The DeepSeek-VL chat template transformers' conversion script writes (adopted from DeepSeek-VL's conversation.py).
DEEPSEEK_VL_CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}"
    "{% set i = 0 %}"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}"
    "User: "
    "{% elif message['role']|lower == 'assistant' %}"
    "Assistant:{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}"
    "{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<image_placeholder>"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}"
    "{{ text }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}"
    "{% else %}"
    "{{ seps[1] }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

IMAGE_KEYS = ("image", "url", "path", "base64")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def plain_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes ``"<TypeName>"`` (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
    """Render one normalised conversation."""
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=plain_data(messages),
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain_data(kwargs),
        )
    except jinja2.exceptions.TemplateError as e:
        raise UnsupportedContentError(f"chat template failed to render the conversation: {e}") from e


def is_batched(chats: Any) -> bool:
    """transformers' rule: a list whose first element is itself a list/tuple is a batch of conversations."""
    return isinstance(chats, (list, tuple)) and len(chats) > 0 and isinstance(chats[0], (list, tuple))


def normalize_chat(chat: Any) -> tuple[list[dict], list[Any]]:
    """Validate one conversation and return (messages for the template, images in order).

    * keys whose value is None are dropped from messages (as transformers does);
    * string content becomes ``[{"type": "text", "text": content}]`` (the DeepSeek template only reads lists; given a
      bare string it would silently render nothing);
    * OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` items become ``{"type": "image", "url": ...}``;
    * an image item's image is the first of its ``image``/``url``/``path``/``base64`` keys;
    * only ``text`` and ``image`` items are supported; anything else raises `UnsupportedContentError`.
    """
    if not isinstance(chat, (list, tuple)) or len(chat) == 0:
        raise UnsupportedContentError(f"a chat must be a non-empty list of messages, got {type(chat).__name__}")
    messages, images = [], []
    for i, message in enumerate(chat):
        if not isinstance(message, Mapping) or "role" not in message:
            raise UnsupportedContentError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message["role"], str):
            raise UnsupportedContentError(f"message {i}: role must be a string, got {type(message['role']).__name__}")
        content = message.get("content", [])
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise UnsupportedContentError(
                f"message {i}: content must be a string or a list of items, got {type(content).__name__}"
            )
        items = []
        for j, item in enumerate(content):
            if not isinstance(item, Mapping):
                raise UnsupportedContentError(f"message {i} item {j}: content items must be dicts, got {item!r:.80}")
            kind = item.get("type")
            if kind == "image_url" and "image_url" in item:
                url = item["image_url"]
                item = {"type": "image", "url": url.get("url", "") if isinstance(url, Mapping) else url}
                kind = "image"
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise UnsupportedContentError(f"message {i} item {j}: a text item needs a string 'text'")
            elif kind == "image":
                key = next((k for k in IMAGE_KEYS if item.get(k) is not None), None)
                if key is None:
                    raise UnsupportedContentError(
                        f"message {i} item {j}: an image item needs one of the keys {', '.join(IMAGE_KEYS)}"
                    )
                images.append(item[key])
            else:
                raise UnsupportedContentError(
                    f"message {i} item {j}: unsupported content type {kind!r} (supported: 'text', 'image')"
                )
            items.append(dict(item))
        message["content"] = items
        messages.append(message)
    return messages, images

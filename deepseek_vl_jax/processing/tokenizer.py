"""Tokenizer loading, decoding and streaming detokenisation, matching transformers' `TokenizersBackend`.

`load_tokenizer(directory)` reads ``tokenizer.json`` with the `tokenizers` library and applies what transformers
applies on top of it when loading (DeepSeek-VL's ``LlamaTokenizerFast`` + byte-level ``tokenizer.json`` is loaded by
transformers as a plain ``TokenizersBackend``):

* special tokens (bos/eos/pad/unk, the image token and other extra special tokens) come from
  ``tokenizer_config.json`` and ``special_tokens_map.json``; any that is missing from the vocabulary is added as a
  special token;
* the post-processor of ``tokenizer.json`` decides which special tokens (BOS) are added; like transformers, an
  ``add_bos_token``/``add_eos_token`` entry in ``tokenizer_config.json`` is ignored when ``tokenizer.json`` exists
  (transformers pops both before building the tokenizer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer

from .errors import ProcessorConfigError

DEFAULT_IMAGE_TOKEN = "<image_placeholder>"
_NAMED = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProcessorConfigError(f"cannot parse {path}: {e}") from e


@dataclass
class TokenizerInfo:
    """A `tokenizers.Tokenizer` plus the settings transformers keeps next to it."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str | None]  # bos_token, eos_token, pad_token, unk_token, ...
    image_token: str = DEFAULT_IMAGE_TOKEN
    extra_special_tokens: dict[str, str] = field(default_factory=dict)
    padding_side: str = "right"
    model_max_length: int | None = None
    clean_up_tokenization_spaces: bool = False
    config: dict = field(default_factory=dict)

    def token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """What transformers passes to chat templates as extra variables (``bos_token``, ``eos_token``, ...)."""
        out = {k: v for k, v in self.special_tokens.items() if v is not None}
        out.update(self.extra_special_tokens)
        return out


def load_tokenizer(directory: str) -> TokenizerInfo:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise ProcessorConfigError(f"{directory!r} has no tokenizer.json")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ProcessorConfigError(f"cannot load {path}: {e}") from e
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))

    special = {}
    for name in _NAMED:
        special[name] = _token_str(config.get(name, special_map.get(name)))
    extra: dict[str, str] = {}
    for source in (special_map.get("extra_special_tokens"), config.get("extra_special_tokens")):
        if isinstance(source, dict):
            extra.update({k: _token_str(v) for k, v in source.items()})
    for key in ("image_token",):
        if config.get(key) is not None:
            extra[key] = _token_str(config[key])
    image_token = extra.get("image_token", DEFAULT_IMAGE_TOKEN)
    extra.setdefault("image_token", image_token)

    # Tokens listed in the config but missing from the vocabulary are added as special tokens (transformers does).
    decoder = config.get("added_tokens_decoder") or {}
    for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        content = _token_str(spec)
        if content is not None and tok.token_to_id(content) is None:
            tok.add_special_tokens([_added_token(spec)])
    for token in [*special.values(), *extra.values()]:
        if token is not None and tok.token_to_id(token) is None:
            tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    return TokenizerInfo(
        tokenizer=tok,
        special_tokens=special,
        image_token=image_token,
        extra_special_tokens=extra,
        padding_side=config.get("padding_side", "right"),
        model_max_length=config.get("model_max_length"),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        config=config,
    )


def _added_token(spec: dict) -> AddedToken:
    return AddedToken(
        spec["content"],
        single_word=spec.get("single_word", False),
        lstrip=spec.get("lstrip", False),
        rstrip=spec.get("rstrip", False),
        normalized=spec.get("normalized", False),
        special=spec.get("special", True),
    )


def clean_up_tokenization(text: str) -> str:
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def decode(info: TokenizerInfo, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """transformers' decode: `tokenizers` decode; the space clean-up is skipped for BPE models, as transformers does."""
    text = info.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    if info.clean_up_tokenization_spaces and type(info.tokenizer.model).__name__ != "BPE":
        text = clean_up_tokenization(text)
    return text


class IncrementalDecoder:
    """Streaming detokeniser: feed token ids one at a time, get text deltas.

    Keeps a small window of already-emitted tokens as context (decoders such as byte-level BPE or metaspace need
    it) and holds text back while the decoded tail ends in U+FFFD, i.e. while a multi-byte UTF-8 character is still
    incomplete. The concatenation of all deltas (plus `flush()`) equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: "Tokenizer | TokenizerInfo", skip_special_tokens: bool = False):
        self._tok = tokenizer.tokenizer if isinstance(tokenizer, TokenizerInfo) else tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token id; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd") and text.startswith(prefix_text):
            delta = text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Emit whatever is still held back (at end of stream; may contain U+FFFD if the stream ended mid-char)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :] if text.startswith(prefix_text) else text

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0

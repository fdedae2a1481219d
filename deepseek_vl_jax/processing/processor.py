"""`DeepseekVLProcessor`: chats with images -> model inputs, identical to transformers'
``DeepseekVLProcessor``/``DeepseekVLHybridProcessor`` ``apply_chat_template(..., tokenize=True, return_dict=True,
padding=True)`` with the PIL image backend.

Steps (same order as transformers):
1. normalise each chat and collect its images (`chat_template.normalize_chat`);
2. render the chat template with the tokenizer's special tokens as extra variables;
3. check that the number of ``<image_placeholder>`` occurrences equals the number of images;
4. replace each placeholder by ``num_image_tokens`` image tokens and tokenise the batch; the tokenizer's
   post-processor adds BOS unless the first prompt already starts with the BOS token;
5. pad to the longest prompt with the pad token on ``padding_side`` (attention mask 0 on padding);
6. preprocess all images of the batch, in order (`image_processor.DeepseekVLImageProcessor`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

from . import chat_template as ct
from .errors import ImageCountError, ProcessorConfigError, PromptTooLongError
from .image_processor import DeepseekVLImageProcessor, ImageProcessorConfig
from .tokenizer import IncrementalDecoder, TokenizerInfo, _read_json, decode, load_tokenizer

# Files that make a processor directory (those present are copied by `save_pretrained`).
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

DEFAULT_NUM_IMAGE_TOKENS = 576


def _find_chat_template(directory: str, processor_config: dict, tokenizer_config: dict) -> str | None:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    for source in (processor_config, _read_json(os.path.join(directory, "chat_template.json")), tokenizer_config):
        template = source.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str):
            return template
    return None


class DeepseekVLProcessor:
    """Turns chats (with images) into ``input_ids``/``attention_mask``/``pixel_values`` (+ ``high_res_pixel_values``
    for the hybrid model), and decodes generated ids."""

    def __init__(
        self,
        tokenizer: TokenizerInfo,
        image_processor: DeepseekVLImageProcessor,
        chat_template: str | None = None,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        source_dir: str | None = None,
        processor_config: dict | None = None,
    ):
        self.tokenizer_info = tokenizer
        self.tokenizer = tokenizer.tokenizer  # the `tokenizers.Tokenizer`
        self.image_processor = image_processor
        self.chat_template = chat_template if chat_template is not None else ct.DEEPSEEK_VL_CHAT_TEMPLATE
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = tokenizer.image_token
        self.image_token_id = self.tokenizer.token_to_id(self.image_token)
        if self.image_token_id is None:
            raise ProcessorConfigError(f"image token {self.image_token!r} is not in the tokenizer vocabulary")
        self.bos_token = tokenizer.special_tokens.get("bos_token")
        self.eos_token = tokenizer.special_tokens.get("eos_token")
        self.pad_token = tokenizer.special_tokens.get("pad_token")
        self.bos_token_id = tokenizer.token_id("bos_token")
        self.eos_token_id = tokenizer.token_id("eos_token")
        self.pad_token_id = tokenizer.token_id("pad_token")
        self.padding_side = tokenizer.padding_side
        self.source_dir = source_dir
        self.processor_config = dict(processor_config or {})

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def is_hybrid(self) -> bool:
        return self.image_processor.is_hybrid

    @property
    def model_input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", *self.image_processor.model_input_names)

    # ------------------------------------------------------------------------------------------------- rendering
    def render(self, chat: Any, add_generation_prompt: bool = False, **template_kwargs) -> str:
        """The prompt string for one chat (image placeholders not yet expanded)."""
        messages, _ = ct.normalize_chat(chat)
        return self._render(messages, add_generation_prompt, template_kwargs)

    def _render(self, messages: list[dict], add_generation_prompt: bool, template_kwargs: dict) -> str:
        variables = {**self.tokenizer_info.special_tokens_map, **template_kwargs}
        return ct.render(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **variables)

    def expand_image_tokens(self, prompt: str) -> str:
        return prompt.replace(self.image_token, self.image_token * self.num_image_tokens)

    # ------------------------------------------------------------------------------------------------ processing
    def __call__(
        self,
        chats: Any,
        add_generation_prompt: bool = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        images: Sequence[Any] | None = None,
        **template_kwargs,
    ) -> dict[str, np.ndarray]:
        """Process one chat or a batch of chats.

        `chats`: a chat (list of ``{"role", "content"}`` messages) or a list of chats. `images` optionally replaces
        the images found in the content items (one list per chat, or a flat list for a single chat).
        `max_length`: raise `PromptTooLongError` if any prompt has more tokens. Returns numpy arrays: ``input_ids``
        and ``attention_mask`` (int32, shape (batch, longest)), ``pixel_values`` (float32, (num_images, 3, S, S))
        and for the hybrid model ``high_res_pixel_values`` — the image keys are absent when there are no images.
        """
        batch = chats if ct.is_batched(chats) else [chats]
        prompts, batch_images = [], []
        for chat in batch:
            messages, chat_images = ct.normalize_chat(chat)
            prompts.append(self._render(messages, add_generation_prompt, template_kwargs))
            batch_images.append(chat_images)
        if images is not None:
            batch_images = [list(x) for x in images] if ct.is_batched(images) else [list(images)]
        return self.process_prompts(prompts, batch_images, padding_side=padding_side, max_length=max_length)

    def process_prompts(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | Sequence[Any] | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Already-rendered prompts (containing ``<image_placeholder>``) + their images -> model inputs.

        `add_special_tokens=None` follows transformers' chat rule: add them (i.e. BOS) unless the first prompt
        already starts with the BOS token."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        flat_images = _flatten_images(images)
        placeholders = [p.count(self.image_token) for p in prompts]
        if sum(placeholders) != len(flat_images):
            raise ImageCountError(
                f"the prompts contain {sum(placeholders)} image placeholder(s) {self.image_token!r} "
                f"(per prompt: {placeholders}) but {len(flat_images)} image(s) were given"
            )
        if add_special_tokens is None:
            add_special_tokens = not (self.bos_token is not None and prompts and prompts[0].startswith(self.bos_token))
        texts = [self.expand_image_tokens(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        lengths = [len(x) for x in ids]
        if max_length is not None and max(lengths) > max_length:
            worst = int(np.argmax(lengths))
            raise PromptTooLongError(
                f"prompt {worst} has {lengths[worst]} tokens, more than max_length={max_length} "
                f"(prompt lengths: {lengths}; each image counts {self.num_image_tokens} tokens)"
            )
        out = self._pad(ids, padding_side or self.padding_side)
        if flat_images:
            out.update(self.image_processor(flat_images))
        return out

    def _pad(self, ids: list[list[int]], side: str) -> dict[str, np.ndarray]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(x) for x in ids)
        if any(len(x) != longest for x in ids) and self.pad_token_id is None:
            raise ProcessorConfigError("cannot pad the batch: the tokenizer has no pad token")
        input_ids = np.full((len(ids), longest), self.pad_token_id or 0, dtype=np.int32)
        mask = np.zeros((len(ids), longest), dtype=np.int32)
        for row, seq in enumerate(ids):
            n = len(seq)
            sl = slice(longest - n, longest) if side == "left" else slice(0, n)
            input_ids[row, sl] = seq
            mask[row, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def training_example(self, chat: Any, max_length: int | None = None, **template_kwargs) -> dict[str, np.ndarray]:
        """Inputs and labels for one chat ending with an assistant turn; see `labels.build_training_example`."""
        from .labels import build_training_example

        return build_training_example(self, chat, max_length=max_length, **template_kwargs)

    # -------------------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return decode(self.tokenizer_info, np.asarray(ids).reshape(-1).tolist(), skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self.tokenizer_info, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, directory: str) -> list[str]:
        """Write a processor directory (loadable by `load_processor` and by transformers' AutoProcessor).

        A processor loaded from a directory copies that directory's `PROCESSOR_FILES` verbatim; otherwise the files
        are written from the loaded settings. Returns the paths written."""
        os.makedirs(directory, exist_ok=True)
        written = []
        if self.source_dir is not None:
            for name in PROCESSOR_FILES:
                src = os.path.join(self.source_dir, name)
                dst = os.path.join(directory, name)
                if os.path.isfile(src):
                    if os.path.abspath(src) != os.path.abspath(dst):
                        shutil.copyfile(src, dst)
                    written.append(dst)
            if written:
                return written
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        tok_cfg = dict(self.tokenizer_info.config)
        tok_cfg.update({k: v for k, v in self.tokenizer_info.special_tokens.items() if v is not None})
        tok_cfg.setdefault("image_token", self.image_token)
        proc_cfg = dict(self.processor_config)
        proc_cfg.update(
            image_processor=self.image_processor.config.to_dict(),
            num_image_tokens=self.num_image_tokens,
            processor_class="DeepseekVLHybridProcessor" if self.is_hybrid else "DeepseekVLProcessor",
        )
        for name, data in (("tokenizer_config.json", tok_cfg), ("processor_config.json", proc_cfg)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
        with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(self.chat_template)
        names = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja")
        return [os.path.join(directory, n) for n in names]

    def __repr__(self) -> str:
        return (
            f"DeepseekVLProcessor(hybrid={self.is_hybrid}, num_image_tokens={self.num_image_tokens}, "
            f"image_size={self.image_processor.config.size}, vocab={self.tokenizer.get_vocab_size()})"
        )


def _flatten_images(images) -> list[Any]:
    if images is None:
        return []
    flat = []
    for item in images:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


def load_processor(path: str | os.PathLike) -> DeepseekVLProcessor:
    """Load a processor from a transformers-format directory (tokenizer + processor/preprocessor config + template),
    or from an original deepseek-ai directory (`original.load_original_processor`)."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise ProcessorConfigError(f"processor directory {directory!r} does not exist")
    from .original import is_original_processor_dir, load_original_processor

    if is_original_processor_dir(directory):  # deepseek-ai's VLChatProcessor files: read as the original processes
        return load_original_processor(directory)
    tokenizer = load_tokenizer(directory)
    processor_config = _read_json(os.path.join(directory, "processor_config.json"))
    image_dict = processor_config.get("image_processor")
    if not isinstance(image_dict, dict):
        image_dict = _read_json(os.path.join(directory, "preprocessor_config.json"))
    hybrid = None
    if "Hybrid" in str(processor_config.get("processor_class", "")) or "Hybrid" in str(
        image_dict.get("processor_class", "")
    ):
        hybrid = True
    image_config = ImageProcessorConfig.from_dict(image_dict, hybrid=hybrid)
    num_image_tokens = processor_config.get("num_image_tokens", image_dict.get("num_image_tokens"))
    template = _find_chat_template(directory, processor_config, tokenizer.config)
    return DeepseekVLProcessor(
        tokenizer,
        DeepseekVLImageProcessor(image_config),
        chat_template=template,
        num_image_tokens=DEFAULT_NUM_IMAGE_TOKENS if num_image_tokens is None else num_image_tokens,
        source_dir=directory,
        processor_config=processor_config,
    )

"""The original deepseek-ai processor files (`VLChatProcessor`, `VLMImageProcessor`) read as this library's processor.

An original directory (deepseek-ai/deepseek-vl-1.3b-chat, deepseek-vl-7b-chat) describes its processing in three
places: `preprocessor_config.json` (`VLMImageProcessor`: size, min_size, rescale, `do_normalize: false`, and the
mean that only sets the padding colour), `config.json` (the towers' `pixel_mean` / `pixel_std`: the original towers
normalise their input themselves, per tower for the hybrid) and `processor_config.json` (`VLChatProcessor`:
`<image_placeholder>`, 576 image tokens, `sft_format: deepseek`). Its tokenizer has no pad token (the original pads
with end-of-sentence, on the left) and no chat template (the original builds the prompt in Python).

`load_original_processor` turns these into a `DeepseekVLProcessor` that produces the original's inputs: the towers'
normalisation moved into the image processor, the original's floored resize (`resize_rounding="floor"`) and, for the
hybrid, its two resolutions (the high-res image as the original processor makes it, the low-res one as its
`HybridVisionTower` makes it: `low_res_resize="antialiased_bilinear"`), eos as the pad token, left padding, and
`ORIGINAL_CHAT_TEMPLATE` (the `deepseek` conversation format). `convert` writes it with `save_pretrained`, so a
converted directory loads the same way, and transformers can read it too (it ignores `resize_rounding` and
`low_res_resize`: it rounds the resized sides, and makes the hybrid's low-res image by a bicubic resize of the
padded high-res picture).
"""

from __future__ import annotations

import os

from .errors import ProcessorConfigError
from .tokenizer import _read_json

VL_CHAT_PROCESSOR = "VLChatProcessor"
VLM_IMAGE_PROCESSOR = "VLMImageProcessor"
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. "
                 "You are able to understand the visual content that the user provides, "
                 "and assist the user with a variety of tasks using natural language.")

# deepseek_vl/utils/conversation.py, template "deepseek", as VLChatProcessor applies it: the system prompt + "\n\n";
# then per message (each stripped) "Role: text" + a separator alternating "\n\n" / end-of-sentence by message index,
# or "Role:" for an empty message; the whole prompt stripped. The generation prompt is the empty "Assistant" message.
# A leading system message replaces the system prompt. Written over several lines: it relies on trim_blocks and
# lstrip_blocks, as transformers renders chat templates.
ORIGINAL_CHAT_TEMPLATE = """{% set seps = ['\\n\\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}
{% set ns = namespace(system='""" + SYSTEM_PROMPT + """', prompt='', index=0) %}
{% for message in messages %}
    {% set ns.text = '' %}
    {% if message['content'] is string %}
        {% set ns.text = message['content'] %}
    {% else %}
        {% for content in message['content'] %}
            {% if content['type'] == 'image' %}
                {% set ns.text = ns.text + '<image_placeholder>' %}
            {% elif content['type'] == 'text' %}
                {% set ns.text = ns.text + content['text'] %}
            {% endif %}
        {% endfor %}
    {% endif %}
    {% if message['role'] == 'system' and loop.first %}
        {% set ns.system = ns.text | trim %}
    {% else %}
        {% set role = message['role'] | capitalize %}
        {% if ns.text | trim %}
            {% set ns.prompt = ns.prompt + role + ': ' + (ns.text | trim) + seps[ns.index % 2] %}
        {% else %}
            {% set ns.prompt = ns.prompt + role + ':' %}
        {% endif %}
        {% set ns.index = ns.index + 1 %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {% set ns.prompt = ns.prompt + 'Assistant:' %}
{% endif %}
{{ ((ns.system + seps[0] if ns.system else '') + ns.prompt) | trim }}"""


def is_original_processor_dir(directory: str) -> bool:
    """True for an unconverted deepseek-ai directory (VLChatProcessor / VLMImageProcessor files)."""
    pre = _read_json(os.path.join(directory, "preprocessor_config.json"))
    proc = _read_json(os.path.join(directory, "processor_config.json"))
    return (pre.get("image_processor_type") == VLM_IMAGE_PROCESSOR or proc.get("processor_class") == VL_CHAT_PROCESSOR
            or pre.get("processor_class") == VL_CHAT_PROCESSOR)


def _background(mean) -> tuple[int, ...]:
    return (127, 127, 127) if mean is None else tuple(int(x * 255) for x in mean)


def _tower_norm(params: dict, where: str, pre: dict) -> tuple[list | None, list | None]:
    """The mean/std the image processor must apply for one tower (the tower's own, moved out of the model)."""
    mean, std = params.get("pixel_mean"), params.get("pixel_std")
    if mean is not None and std is not None:
        if pre.get("do_normalize", True):
            raise ProcessorConfigError(f"{where}: the tower normalises its input (pixel_mean/pixel_std) and "
                                       f"preprocessor_config.json has do_normalize true: the pixels are normalised "
                                       f"twice, which this library cannot represent")
        return list(mean), list(std)
    if pre.get("do_normalize", True):
        return list(pre.get("image_mean")), list(pre.get("image_std"))
    return [0.0] * 3, [1.0] * 3


def original_image_processor_dict(directory: str) -> dict:
    """This library's image-processor settings (transformers' names) for an original directory."""
    pre = _read_json(os.path.join(directory, "preprocessor_config.json"))
    config = _read_json(os.path.join(directory, "config.json"))
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else None
    if not pre or vision is None:
        raise ProcessorConfigError(f"{directory}: an original deepseek-ai processor needs preprocessor_config.json "
                                   f"and the model's config.json (the towers' pixel_mean / pixel_std): run "
                                   f"`deepseek-vl-jax convert` on the complete original directory")
    params = vision.get("params", {})
    hybrid = vision.get("cls") == "HybridVisionTower"
    size = int(pre.get("image_size", 384))
    out = {"size": {"height": size, "width": size}, "min_size": int(pre.get("min_size", 14)), "resample": 3,
           "do_resize": True, "do_pad": True, "do_rescale": True,
           "rescale_factor": float(pre.get("rescale_factor", 1 / 255)), "do_normalize": True,
           "resize_rounding": "floor"}
    where = os.path.join(directory, "config.json")
    if hybrid:
        high, low = params.get("high_res_cfg", {}), params.get("low_res_cfg", {})
        if int(high.get("image_size", size)) != size:
            raise ProcessorConfigError(f"{where}: high_res_cfg.image_size {high.get('image_size')} differs from "
                                       f"preprocessor_config.json image_size {size}")
        mean, std = _tower_norm(high, where, pre)
        low_mean, low_std = _tower_norm(low, where, pre)
        low_size = int(low.get("image_size", 384))
        out.update(image_processor_type="DeepseekVLHybridImageProcessor", size={"height": low_size, "width": low_size},
                   high_res_size={"height": size, "width": size}, high_res_resample=3, image_mean=low_mean,
                   image_std=low_std, high_res_image_mean=mean, high_res_image_std=std,
                   low_res_resize="antialiased_bilinear")
    else:
        mean, std = _tower_norm(params, where, pre)
        out.update(image_processor_type="DeepseekVLImageProcessor", image_mean=mean, image_std=std)
    if _background(mean) != _background(pre.get("image_mean")):
        raise ProcessorConfigError(f"{directory}: the original pads with {_background(pre.get('image_mean'))} "
                                   f"(preprocessor image_mean) but the tower's mean gives {_background(mean)}; "
                                   f"this library derives the padding colour from the normalisation mean")
    return out


def load_original_processor(directory: str):
    """A `DeepseekVLProcessor` producing exactly the original code's inputs for an original directory."""
    from .image_processor import DeepseekVLImageProcessor, ImageProcessorConfig
    from .processor import DEFAULT_NUM_IMAGE_TOKENS, DeepseekVLProcessor
    from .tokenizer import load_tokenizer

    image = original_image_processor_dict(directory)
    hybrid = "high_res_size" in image
    proc = _read_json(os.path.join(directory, "processor_config.json"))
    if proc.get("sft_format", "deepseek") != "deepseek":
        raise ProcessorConfigError(f"{directory}: sft_format {proc.get('sft_format')!r}: only the 'deepseek' "
                                   f"conversation format is supported")
    tokenizer = load_tokenizer(directory)
    image_tag = proc.get("image_tag", tokenizer.image_token)
    tokenizer.image_token = image_tag
    tokenizer.extra_special_tokens["image_token"] = image_tag
    eos = tokenizer.special_tokens.get("eos_token")
    if tokenizer.special_tokens.get("pad_token") is None:
        tokenizer.special_tokens["pad_token"] = eos  # the original pads with eos ...
    tokenizer.padding_side = "left"  # ... on the left
    tokenizer.config = {**tokenizer.config, "pad_token": tokenizer.special_tokens["pad_token"], "padding_side": "left"}
    tokenizer.config.pop("chat_template", None)
    num_image_tokens = int(proc.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS))
    processor_config = {"processor_class": "DeepseekVLHybridProcessor" if hybrid else "DeepseekVLProcessor",
                        "num_image_tokens": num_image_tokens}
    return DeepseekVLProcessor(tokenizer, DeepseekVLImageProcessor(ImageProcessorConfig.from_dict(image, hybrid)),
                               chat_template=ORIGINAL_CHAT_TEMPLATE, num_image_tokens=num_image_tokens,
                               source_dir=None, processor_config=processor_config)

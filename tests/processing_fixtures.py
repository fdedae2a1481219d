"""Helpers that build tiny DeepSeek-VL processor directories with transformers itself (no hub access).

The tokenizer is a small byte-level BPE trained on a few sentences (the real DeepSeek tokenizer is byte-level BPE
too), with DeepSeek's special tokens added after the learned vocabulary:
``<｜begin▁of▁sentence｜>`` (bos), ``<｜end▁of▁sentence｜>`` (eos, also pad), a few reserved placeholder tokens and the
image token ``<image_placeholder>``. Like the real checkpoints, ``tokenizer_config.json`` declares
``LlamaTokenizerFast`` with ``add_bos_token: true`` and ``extra_special_tokens: {"image_token": ...}``; transformers
loads such a byte-level tokenizer with its generic ``TokenizersBackend``.

The chat template is the one transformers' conversion script (``convert_deepseek_vl_weights_to_hf.py``) writes.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import sys
import tempfile

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # let `import deepseek_vl_jax` work however pytest is invoked
    sys.path.insert(0, _REPO)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"
RESERVED = [f"<｜place▁holder▁no▁{i}｜>" for i in range(4)]

# transformers/models/deepseek_vl/convert_deepseek_vl_weights_to_hf.py (CHAT_TEMPLATE), adopted from DeepSeek-VL's
# deepseek_vl/utils/conversation.py.
CHAT_TEMPLATE = (
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

_CORPUS = [
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.",
    "User: Describe this image in detail. Assistant: The image shows a cat sitting on a red sofa.",
    "What is the difference between these two pictures? One is a dog, the other is a cat.",
    "The quick brown fox jumps over the lazy dog. 1234567890 !?.,;:'\"()[]{}",
    "你好，世界！这是一只猫。图片里有什么？ 😀🐱🚀 café naïve façade über",
    "System: answer briefly. Hello there, how are you today? I am fine, thank you.",
]


def build_tokenizer_object():
    """A byte-level BPE `tokenizers.Tokenizer` with DeepSeek's special tokens (bos added by the post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    tok.add_special_tokens([BOS, EOS, *RESERVED, IMAGE_TOKEN])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_hf_processor(
    hybrid: bool = False,
    image_size: int = 32,
    high_res_size: int = 64,
    num_image_tokens: int = 4,
    min_size: int = 14,
    image_mean=None,
    image_std=None,
    high_res_image_mean=None,
    high_res_image_std=None,
    do_convert_rgb: bool | None = True,
):
    """Build a transformers DeepseekVL(Hybrid)Processor (PIL image backend) around the tiny tokenizer."""
    from transformers import PreTrainedTokenizerFast
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer_object(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=16384,
    )
    kwargs = dict(
        size={"height": image_size, "width": image_size},
        min_size=min_size,
        image_mean=list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN),
        image_std=list(image_std if image_std is not None else OPENAI_CLIP_STD),
    )
    if do_convert_rgb is not None:
        kwargs["do_convert_rgb"] = do_convert_rgb
    if hybrid:
        from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
            DeepseekVLHybridImageProcessorPil,
        )
        from transformers.models.deepseek_vl_hybrid.processing_deepseek_vl_hybrid import DeepseekVLHybridProcessor

        kwargs.update(
            high_res_size={"height": high_res_size, "width": high_res_size},
            high_res_image_mean=list(high_res_image_mean if high_res_image_mean is not None else OPENAI_CLIP_MEAN),
            high_res_image_std=list(high_res_image_std if high_res_image_std is not None else OPENAI_CLIP_STD),
        )
        image_processor = DeepseekVLHybridImageProcessorPil(**kwargs)
        cls = DeepseekVLHybridProcessor
    else:
        from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
        from transformers.models.deepseek_vl.processing_deepseek_vl import DeepseekVLProcessor

        image_processor = DeepseekVLImageProcessorPil(**kwargs)
        cls = DeepseekVLProcessor
    return cls(image_processor, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=num_image_tokens)


def make_processor_dir(path, hybrid: bool = False, **kwargs) -> str:
    """Save a tiny HF processor to `path` the way real checkpoints look, and return the path."""
    os.makedirs(path, exist_ok=True)
    processor = build_hf_processor(hybrid=hybrid, **kwargs)
    processor.save_pretrained(path)
    # Real DeepSeek-VL checkpoints declare LlamaTokenizerFast (with a byte-level tokenizer.json).
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "LlamaTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return str(path)


def load_hf_processor(path):
    """Load the reference processor from a directory with AutoProcessor (PIL backend: torchvision is absent)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), backend="pil")


# ---------------------------------------------------------------------------------------------------------------------
# Cached (once per test session) processor directories and (reference, ours) pairs.
# ---------------------------------------------------------------------------------------------------------------------

_ROOT = tempfile.mkdtemp(prefix="dsvl_proc_")
atexit.register(shutil.rmtree, _ROOT, True)

SMALL = {"image_size": 32, "high_res_size": 64, "num_image_tokens": 4}
REAL = {"image_size": 384, "high_res_size": 1024, "num_image_tokens": 576}


@functools.lru_cache(maxsize=None)
def processor_dir(kind: str = "vl", real: bool = False, do_convert_rgb: bool | None = True) -> str:
    """Directory of a saved tiny processor. kind: "vl" or "hybrid"; real: 384/1024 px and 576 image tokens."""
    name = f"{kind}_{'real' if real else 'small'}_{do_convert_rgb}"
    return make_processor_dir(
        os.path.join(_ROOT, name), hybrid=(kind == "hybrid"), do_convert_rgb=do_convert_rgb, **(REAL if real else SMALL)
    )


@functools.lru_cache(maxsize=None)
def processor_pair(kind: str = "vl", real: bool = False, do_convert_rgb: bool | None = True):
    """(transformers reference processor, our processor) loaded from the same directory."""
    from deepseek_vl_jax.processing import load_processor

    path = processor_dir(kind, real, do_convert_rgb)
    return load_hf_processor(path), load_processor(path)


def scratch_dir(name: str) -> str:
    path = os.path.join(_ROOT, name)
    os.makedirs(path, exist_ok=True)
    return path


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0):
    """A deterministic random PIL image of the given mode (RGBA/LA get a varied alpha channel)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        bands = list(image.split())
        bands[-1] = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return Image.merge(mode, bands)
    if mode == "I;16":
        array = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        image = Image.fromarray(array)
        assert image.mode == "I;16", image.mode
        return image
    if mode == "P_transparent":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    return rgb.convert(mode)


def reference_inputs(hf, chats, padding_side="left", add_generation_prompt=True):
    """transformers' apply_chat_template(tokenize=True, return_dict=True, padding=True) as numpy arrays."""
    hf.tokenizer.padding_side = padding_side
    out = hf.apply_chat_template(
        chats,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs={"padding": True},
    )
    return {k: np.asarray(v) for k, v in out.items()}


def assert_same_inputs(ref: dict, ours: dict, atol: float = 1e-6):
    assert set(ref) == set(ours), (sorted(ref), sorted(ours))
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ref[key], ours[key], err_msg=key)
    for key in ("pixel_values", "high_res_pixel_values"):
        if key in ref:
            assert ref[key].shape == ours[key].shape, (key, ref[key].shape, ours[key].shape)
            assert ours[key].dtype == np.float32
            diff = float(np.abs(ref[key].astype(np.float64) - ours[key]).max()) if ref[key].size else 0.0
            assert diff <= atol, f"{key}: max abs diff {diff}"

"""A byte-level BPE tokenizer trained on the synthetic set, with DeepSeek's special tokens, written together with
the image-processor settings and chat template as a processor directory (the files transformers writes)."""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from deepseek_vl_jax.processing import DEEPSEEK_VL_CHAT_TEMPLATE
from deepseek_vl_jax.processing.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
# SigLIP's normalisation (as in deepseek-community/deepseek-vl-1.3b-chat).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE (like DeepSeek's) with BOS prepended by the post-processor; special tokens at the end."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + [SYSTEM_PROMPT, "User: ", "Assistant:"] * 50, trainer=trainer)
    tok.add_special_tokens([BOS, EOS, IMAGE_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_processor(directory: str, texts: Iterable[str], image_size: int, num_image_tokens: int,
                    vocab_size: int = 512, model_max_length: int = 1024, high_res_size: int | None = None,
                    tokenizer: Tokenizer | None = None) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json, processor_config.json and chat_template.jinja.
    high_res_size: a DeepSeek-VL-Hybrid processor (SAM input of that size, CLIP's normalisation as the 7B's).
    tokenizer: reuse this one (e.g. a trained model's, to start from its weights) instead of training one."""
    os.makedirs(directory, exist_ok=True)
    tok = tokenizer or train_tokenizer(texts, vocab_size)
    tok.save(os.path.join(directory, "tokenizer.json"))
    tokenizer_config = {
        "backend": "tokenizers", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None,
        "image_token": IMAGE_TOKEN, "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
        "processor_class": "DeepseekVLProcessor", "tokenizer_class": "LlamaTokenizerFast",
    }
    background = [int(255 * m) for m in IMAGE_MEAN]
    processor_config = {
        "image_processor": {
            "background_color": background, "do_convert_rgb": True, "do_normalize": True, "do_pad": True,
            "do_rescale": True, "do_resize": True, "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
            "image_processor_type": "DeepseekVLImageProcessor", "min_size": 14, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
        },
        "num_image_tokens": num_image_tokens,
        "processor_class": "DeepseekVLProcessor",
    }
    if high_res_size:
        processor_config["image_processor"].update(
            image_processor_type="DeepseekVLHybridImageProcessor",
            high_res_size={"height": high_res_size, "width": high_res_size}, high_res_resample=3,
            high_res_image_mean=list(OPENAI_CLIP_MEAN), high_res_image_std=list(OPENAI_CLIP_STD))
        processor_config["processor_class"] = tokenizer_config["processor_class"] = "DeepseekVLHybridProcessor"
    for name, data in (("tokenizer_config.json", tokenizer_config), ("processor_config.json", processor_config)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEEPSEEK_VL_CHAT_TEMPLATE)
    return tok

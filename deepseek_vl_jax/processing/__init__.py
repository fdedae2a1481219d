"""Chat + image processing for DeepSeek-VL / DeepSeek-VL-Hybrid, identical to transformers' processors.

Runtime dependencies: numpy, pillow, tokenizers, jinja2 (no transformers/torch).

    processor = load_processor("path/to/hf/checkpoint")
    inputs = processor(chats, add_generation_prompt=True, padding_side="left")
    text = processor.batch_decode(generated_ids, skip_special_tokens=True)
"""

from .chat_template import DEEPSEEK_VL_CHAT_TEMPLATE, normalize_chat, render
from .errors import (
    ImageCountError,
    ImageLoadError,
    ProcessorConfigError,
    ProcessorError,
    PromptTooLongError,
    UnsupportedContentError,
)
from .image_processor import DeepseekVLImageProcessor, ImageProcessorConfig, load_rgb_image
from .labels import IGNORE_INDEX, build_training_example
from .processor import PROCESSOR_FILES, DeepseekVLProcessor, load_processor
from .tokenizer import IncrementalDecoder, TokenizerInfo, load_tokenizer

__all__ = [
    "DEEPSEEK_VL_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "PROCESSOR_FILES",
    "DeepseekVLImageProcessor",
    "DeepseekVLProcessor",
    "ImageCountError",
    "ImageLoadError",
    "ImageProcessorConfig",
    "IncrementalDecoder",
    "ProcessorConfigError",
    "ProcessorError",
    "PromptTooLongError",
    "TokenizerInfo",
    "UnsupportedContentError",
    "build_training_example",
    "load_processor",
    "load_rgb_image",
    "load_tokenizer",
    "normalize_chat",
    "render",
]

"""DeepSeek-VL and DeepSeek-VL-Hybrid in JAX/Flax.

    model = deepseek_vl_jax.load_pretrained(path)          # HF directory or converted Flax checkpoint
    processor = deepseek_vl_jax.load_processor(path)
    tokens = deepseek_vl_jax.generate(model, processor(chats), max_new_tokens=64)
    pipe = deepseek_vl_jax.pipeline("image-text-to-text", model=path)   # transformers' pipeline interface
"""

import importlib

from deepseek_vl_jax.config import ConfigError, ModelConfig, SamConfig, SiglipConfig, TextConfig
from deepseek_vl_jax.hf_mapping import MappingError
from deepseek_vl_jax.multimodal import ImageTokenError
from deepseek_vl_jax.pretrained import Model, init_params, load_pretrained
from deepseek_vl_jax.rope import RopeConfig
from deepseek_vl_jax.safetensors_io import CheckpointError

# Names imported on first use (their modules pull in orbax, tokenizers, ...).
_LAZY = {
    "load_processor": "deepseek_vl_jax.processing",
    "generate": "deepseek_vl_jax.generation",
    "GenerateOutput": "deepseek_vl_jax.generation",
    "pipeline": "deepseek_vl_jax.pipelines",
    "TextStreamer": "deepseek_vl_jax.generation",
    "compile_count": "deepseek_vl_jax.generation",
    "train": "deepseek_vl_jax.training",
    "TrainConfig": "deepseek_vl_jax.training",
    "convert": "deepseek_vl_jax.conversion",
    "export": "deepseek_vl_jax.conversion",
    "save_flax_checkpoint": "deepseek_vl_jax.conversion",
    "restore_params": "deepseek_vl_jax.conversion",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepseek_vl_jax' has no attribute {name!r}")


__all__ = [
    "CheckpointError", "ConfigError", "ImageTokenError", "MappingError", "Model", "ModelConfig", "RopeConfig",
    "SamConfig", "SiglipConfig", "TextConfig", "init_params", "load_pretrained", *_LAZY,
]

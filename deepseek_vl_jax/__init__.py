"""DeepSeek-VL and DeepSeek-VL-Hybrid in JAX/Flax."""

from deepseek_vl_jax.config import ConfigError, ModelConfig, SamConfig, SiglipConfig, TextConfig
from deepseek_vl_jax.hf_mapping import MappingError
from deepseek_vl_jax.multimodal import ImageTokenError
from deepseek_vl_jax.pretrained import Model, init_params, load_pretrained
from deepseek_vl_jax.rope import RopeConfig
from deepseek_vl_jax.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "ImageTokenError", "MappingError", "Model", "ModelConfig", "RopeConfig",
    "SamConfig", "SiglipConfig", "TextConfig", "init_params", "load_pretrained",
]

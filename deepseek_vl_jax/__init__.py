"""DeepSeek-VL and DeepSeek-VL-Hybrid in JAX/Flax.

    model = deepseek_vl_jax.load_pretrained(path)          # HF directory or converted Flax checkpoint
    processor = deepseek_vl_jax.load_processor(path)
    tokens = deepseek_vl_jax.generate(model, processor(chats), max_new_tokens=64)
    pipe = deepseek_vl_jax.pipeline("image-text-to-text", model=path)   # transformers' pipeline interface
"""

import importlib

# Every public name is imported on first use, so `import deepseek_vl_jax` (and the CLI's --help) does not pull in
# jax, flax, orbax or tokenizers before they are needed.
_LAZY = {
    "ConfigError": "deepseek_vl_jax.config",
    "ModelConfig": "deepseek_vl_jax.config",
    "SamConfig": "deepseek_vl_jax.config",
    "SiglipConfig": "deepseek_vl_jax.config",
    "TextConfig": "deepseek_vl_jax.config",
    "MappingError": "deepseek_vl_jax.hf_mapping",
    "ImageTokenError": "deepseek_vl_jax.multimodal",
    "Model": "deepseek_vl_jax.pretrained",
    "init_params": "deepseek_vl_jax.pretrained",
    "load_pretrained": "deepseek_vl_jax.pretrained",
    "RopeConfig": "deepseek_vl_jax.rope",
    "CheckpointError": "deepseek_vl_jax.safetensors_io",
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
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepseek_vl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)

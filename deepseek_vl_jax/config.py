"""Typed, frozen model configs parsed from an HF `config.json`, in one place.

Frozen dataclasses are hashable, so a config can be a static argument of `jax.jit`; a typo in a field name fails
at once. `ModelConfig.from_hf` accepts both spellings transformers has used: (`rope_theta`, `rope_scaling`,
`torch_dtype`) and (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from deepseek_vl_jax.common import ACTIVATIONS, ModelType, RematPolicy
from deepseek_vl_jax.rope import RopeConfig


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-VL model."""


def _take(d: dict, cls, where: str, required: tuple[str, ...], renames: dict | None = None, **overrides):
    """Build dataclass `cls` from dict `d`: required keys must be present, other fields fall back to defaults."""
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    renames = renames or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, f.name)
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif key in d and d[key] is not None:
            value = d[key]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _check_act(name: str, where: str) -> None:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where}: unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The LLaMA decoder (`text_config`, model_type `llama`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    rope: RopeConfig = RopeConfig()
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        _check_act(self.hidden_act, "text_config")

    @classmethod
    def from_hf(cls, d: dict) -> "TextConfig":
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        return _take(d, cls, "text_config", required, rope=RopeConfig.from_hf(d))


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """The SigLIP low-resolution vision tower (`vision_config`, model_type `siglip_vision_model`)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        _check_act(self.hidden_act, "vision_config")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config: image_size {self.image_size} not a multiple of patch {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> "SiglipConfig":
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size")
        return _take(d, cls, "vision_config", required)


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """The SAM ViT high-resolution tower (`high_res_vision_config`, model_type `sam_vision_model`)."""

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_dim: int = 3072
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)

    def __post_init__(self):
        _check_act(self.hidden_act, "high_res_vision_config")
        if not self.global_attn_indexes:
            raise ConfigError("high_res_vision_config: global_attn_indexes is empty; the hybrid model needs one")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"high_res_vision_config: global_attn_indexes {bad} outside [0, {self.num_hidden_layers})")

    @classmethod
    def from_hf(cls, d: dict) -> "SamConfig":
        d = dict(d)
        if d.get("mlp_dim") is None:
            d["mlp_dim"] = int(d.get("hidden_size", 768) * d.get("mlp_ratio", 4.0))
        return _take(d, cls, "high_res_vision_config", ())


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole DeepSeek-VL (or -Hybrid) model, plus the runtime settings that are not in `config.json`.

    dtype: compute dtype of matmuls ('float32' for parity, 'bfloat16' for TPU/GPU, 'float16' for GPUs); softmax and
      norms run in float32.
    param_dtype: dtype the parameters are stored in.
    remat_policy: what the backward pass recomputes (see `common.RematPolicy`).
    """

    model_type: ModelType
    text: TextConfig
    vision: SiglipConfig
    high_res: SamConfig | None = None
    image_token_id: int = 100015
    tie_word_embeddings: bool = True
    checkpoint_dtype: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: RematPolicy = RematPolicy.NONE

    def __post_init__(self):
        object.__setattr__(self, "model_type", ModelType(self.model_type))
        object.__setattr__(self, "remat_policy", RematPolicy(self.remat_policy))
        if self.is_hybrid and self.high_res is None:
            raise ConfigError("deepseek_vl_hybrid needs a high_res_vision_config")

    @property
    def is_hybrid(self) -> bool:
        return self.model_type == ModelType.DEEPSEEK_VL_HYBRID

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image: one per SigLIP patch (576 at 384 px / 16)."""
        return self.vision.num_patches

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, d: dict, **runtime: Any) -> "ModelConfig":
        """Parse an HF DeepSeek-VL config dict; `runtime` sets dtype / param_dtype / remat_policy."""
        model_type = d.get("model_type")
        known = [m.value for m in ModelType]
        if model_type == "multi_modality":  # conversion.original_config.ORIGINAL_MODEL_TYPE (not imported: a cycle)
            raise ConfigError("an original deepseek-ai checkpoint (model_type 'multi_modality'): convert it first, "
                              "`deepseek-vl-jax convert SRC DST`, then use DST")
        if model_type not in known:
            raise ConfigError(f"unknown model_type {model_type!r}; this library reads {known}")
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"{model_type}: config has no {key}")
        high_res = None
        if model_type == ModelType.DEEPSEEK_VL_HYBRID.value:
            if not isinstance(d.get("high_res_vision_config"), dict):
                raise ConfigError(f"{model_type}: config has no high_res_vision_config")
            high_res = SamConfig.from_hf(d["high_res_vision_config"])
        return cls(
            model_type=ModelType(model_type),
            text=TextConfig.from_hf(d["text_config"]),
            vision=SiglipConfig.from_hf(d["vision_config"]),
            high_res=high_res,
            image_token_id=d.get("image_token_id", 100015),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            checkpoint_dtype=d.get("dtype") or d.get("torch_dtype"),
            **runtime,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **runtime: Any) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
        if not os.path.exists(file):
            raise ConfigError(f"no config.json at {path}")
        try:
            with open(file) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf(d, **runtime)

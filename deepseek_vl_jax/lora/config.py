"""The LoRA / QLoRA setting: rank, alpha, dropout, which Dense modules get adapters, and how the frozen base is
stored.

Targets are regular expressions matched (whole) against the "/"-joined module path of each Dense layer in the
Flax tree, e.g. `language_model/layers/self_attn/q_proj`, `vision_model/layers/mlp/fc1`, `aligner/linear1`,
`high_res_vision_model/layers/attn/qkv`. A scanned stack (`layers`) gets one adapter per layer, stacked like its
kernel.
"""

from __future__ import annotations

import dataclasses
import enum

# The language model's attention and MLP projections (PEFT's usual LLaMA targets).
LANGUAGE_TARGETS = (r"language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)",)


class BaseQuant(str, enum.Enum):
    """How the frozen kernels of the targeted modules are stored (QLoRA when not NONE)."""

    NONE = "none"  # as loaded (float32 / bfloat16)
    INT8 = "int8"  # symmetric int8, one scale per output channel and group of inputs
    INT4 = "int4"  # symmetric int4 (two per byte), one scale per output channel and group of inputs


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 switches LoRA off. The adapter update is `(alpha / rank) * dropout(x) @ A @ B` with A [in, rank]
    (PEFT's kaiming-uniform init) and B [rank, out] (zeros), so training starts from the base model exactly."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LANGUAGE_TARGETS
    quantize: BaseQuant = BaseQuant.NONE
    group_size: int = 64  # inputs per quantization scale (the whole input axis when it does not divide)

    def __post_init__(self):
        object.__setattr__(self, "quantize", BaseQuant(self.quantize))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty; name at least one module pattern")
        if self.quantize is not BaseQuant.NONE and not self.rank:
            raise ValueError("lora.quantize needs lora.rank > 0 (QLoRA quantizes the base under the adapters)")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"lora.group_size must be an even number >= 2, got {self.group_size}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

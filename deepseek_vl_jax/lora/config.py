"""The LoRA / QLoRA setting: rank, alpha, dropout, which Dense modules get adapters, and how the frozen base is
stored.

Targets are regular expressions matched (whole) against the "/"-joined module path of each Dense layer in the
Flax tree, e.g. `language_model/layers/self_attn/q_proj`, `vision_model/layers/mlp/fc1`, `aligner/linear1`,
`high_res_vision_model/layers_\\d+/attn/qkv`. A scanned stack (`layers`) gets one adapter per layer, stacked like
its kernel.
"""

from __future__ import annotations

import dataclasses

from deepseek_vl_jax.quantization import DEFAULT_GROUP_SIZE, SCHEMES, QuantizeConfig, Scheme

# The language model's attention and MLP projections (PEFT's usual LLaMA targets).
LANGUAGE_TARGETS = (r"language_model/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)",)
NO_QUANTIZE = "none"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 switches LoRA off. The adapter update is `(alpha / rank) * dropout(x) @ A @ B` with A [in, rank]
    (PEFT's kaiming-uniform init) and B [rank, out] (zeros), so training starts from the base model exactly.

    quantize: "none", or "int8" / "int4" for QLoRA: the frozen base is `deepseek_vl_jax.quantization`'s weights
    (the decoder's linear layers as `QTensor`s, int8 per output channel or int4 per `group_size` inputs),
    quantized tensor by tensor while loading."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LANGUAGE_TARGETS
    quantize: str = NO_QUANTIZE
    group_size: int = 64  # int4: inputs per scale (must divide every quantized kernel's input width)

    def __post_init__(self):
        quantize = getattr(self.quantize, "value", self.quantize) or NO_QUANTIZE
        object.__setattr__(self, "quantize", quantize)
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty; name at least one module pattern")
        if quantize not in (NO_QUANTIZE, *SCHEMES):
            raise ValueError(f"lora.quantize must be one of {', '.join((NO_QUANTIZE, *SCHEMES))}, got {quantize!r}")
        if quantize != NO_QUANTIZE and not self.rank:
            raise ValueError("lora.quantize needs lora.rank > 0 (QLoRA quantizes the base under the adapters)")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"lora.group_size must be an even number >= 2, got {self.group_size}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def quantize_config(self) -> QuantizeConfig | None:
        """The base's `quantization.QuantizeConfig` under QLoRA (the decoder's linear layers), else None."""
        if self.quantize == NO_QUANTIZE:
            return None
        scheme = Scheme(self.quantize)
        return QuantizeConfig(scheme, self.group_size if scheme == Scheme.INT4 else DEFAULT_GROUP_SIZE)

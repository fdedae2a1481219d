"""LoRA and QLoRA: adapters by name pattern over the Flax tree, on any tower; merge; PEFT export and import.

A small module of this project rather than qwix's `LoraProvider`: qwix's Linen LoRA creates its adapters as extra
params inside each intercepted module (so they could not be split off as one collection for the trainable mask,
nor given logical axes for `sharding.RULES`), and its QLoRA base is qwix's QArray tree, another checkpoint layout.
The shape is qwix's, though: rules over module paths, and an interceptor on Dense calls; the model is unchanged.

    cfg = LoraConfig(rank=16, alpha=32)                       # the language model's q/k/v/o/gate/up/down
    params = add_adapters(model.params, cfg, jax.random.key(0))
    logits = apply(DeepseekVL(model.config), params, input_ids, mask, pixel_values, config=cfg)
    plain = merge(params, cfg)                                # a plain model's params again
"""

from deepseek_vl_jax.lora.adapters import (ADAPTERS, LoraError, abstract, add_adapters, adapter_paths, apply,
                                           count, inject, is_lora, merge, targets)
from deepseek_vl_jax.lora.config import LANGUAGE_TARGETS, LoraConfig

__all__ = ["ADAPTERS", "LANGUAGE_TARGETS", "LoraConfig", "LoraError", "abstract", "add_adapters",
           "adapter_paths", "apply", "count", "inject", "is_lora", "merge", "targets"]

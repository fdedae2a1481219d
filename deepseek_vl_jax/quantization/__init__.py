"""Weight-only quantization (int8 per output channel, int4 per group): the tensor type and its functions, which
parameters are quantized, and the interceptor that makes the unchanged model compute from them.

    qt = quantize(w, "int4", group_size=128)      # w [..., in, out] -> QTensor (numpy, host)
    w2 = dequantize(qt, jnp.bfloat16)             # jnp, inside jit
    model = load_pretrained(path, quantize="int8")
"""

from deepseek_vl_jax.quantization.ops import dense, embed_attend, embed_lookup, quantized_layers
from deepseek_vl_jax.quantization.params import (
    LeafPlan, QuantizeConfig, abstract_quantized, describe, from_checkpoint_tree, is_quantized, nbytes, plan,
    quantize_leaf, quantize_params, shardings_for, to_checkpoint_tree)
from deepseek_vl_jax.quantization.qtensor import (
    DEFAULT_GROUP_SIZE, QMAX, SCHEMES, QTensor, QuantizationError, Scheme, dequantize, error_bound, int_values,
    pack_int4, quantize, unpack_int4)

__all__ = [
    "DEFAULT_GROUP_SIZE", "QMAX", "SCHEMES", "LeafPlan", "QTensor", "QuantizationError", "QuantizeConfig", "Scheme",
    "abstract_quantized", "dense", "dequantize", "describe", "embed_attend", "embed_lookup", "error_bound",
    "from_checkpoint_tree", "int_values", "is_quantized", "nbytes", "pack_int4", "plan", "quantize",
    "quantize_leaf", "quantize_params", "quantized_layers", "shardings_for", "to_checkpoint_tree", "unpack_int4",
]

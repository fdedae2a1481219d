"""Checkpoint conversion: HF / original deepseek-ai -> Flax (`convert`), Flax -> HF (`export`), `verify`.

Formats and the original-layout key table are documented in `convert/README.md` at the repository root.
"""

from deepseek_vl_jax.conversion.atomic import DestinationExistsError, staged_directory
from deepseek_vl_jax.conversion.convert import convert, detect_layout
from deepseek_vl_jax.conversion.export import export
from deepseek_vl_jax.conversion.flax_checkpoint import (
    MARKER,
    is_flax_checkpoint,
    restore_params,
    save_flax_checkpoint,
)
from deepseek_vl_jax.conversion.orbax_io import LazyArray
from deepseek_vl_jax.conversion.original_config import hf_config_from_original, original_config_from_hf
from deepseek_vl_jax.conversion.original_layout import OriginalCheckpoint, to_original_layout

__all__ = [
    "MARKER", "DestinationExistsError", "LazyArray", "OriginalCheckpoint", "convert", "detect_layout", "export",
    "hf_config_from_original", "is_flax_checkpoint", "original_config_from_hf", "restore_params",
    "save_flax_checkpoint", "staged_directory", "to_original_layout",
]

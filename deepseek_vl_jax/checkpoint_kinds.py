"""Which kind of model directory a path is, told from its file names alone, so that `load_pretrained` imports
`conversion` (and Orbax, ~0.4 s) only for the directories that need it.

An HF directory holds safetensors files; a Flax checkpoint (`deepseek-vl-jax convert`) holds the marker file
`MARKER`; a `train` output directory holds `TRAINING_CHECKPOINTS/` and no safetensors file.
"""

from __future__ import annotations

import os

MARKER = "deepseek_vl_jax_checkpoint.json"
TRAINING_CHECKPOINTS = "checkpoints"


def is_flax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def is_training_output(path: str | os.PathLike) -> bool:
    """A `train` output directory (OUT/config.json and OUT/checkpoints/), not a Flax checkpoint or HF directory."""
    path = os.fspath(path)
    return (not is_flax_checkpoint(path) and os.path.isdir(os.path.join(path, TRAINING_CHECKPOINTS))
            and not any(n.endswith(".safetensors") for n in os.listdir(path)))

"""`--quantize` / `--group-size`, shared by convert, generate, chat and evaluate."""

from __future__ import annotations

import argparse
from typing import Any

from deepseek_vl_jax.quantization.qtensor import DEFAULT_GROUP_SIZE, SCHEMES


def add_arguments(parser: argparse.ArgumentParser, what: str = "quantize the decoder's linear layers on load "
                  "(weight-only; a quantized checkpoint is used as stored)") -> None:
    parser.add_argument("--quantize", choices=SCHEMES, default=None,
                        help=f"{what}: int8 per output channel, int4 per group of input rows")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help=f"int4 group size along the input axis (default {DEFAULT_GROUP_SIZE})")


def from_args(args: Any):
    """The `quantize=` value for --quantize / --group-size (None without --quantize). A plain dict, validated by
    `QuantizeConfig.create` where it is used, so a bad group size is reported like every other error."""
    if getattr(args, "quantize", None) is None:
        return None
    return {"scheme": args.quantize, "group_size": args.group_size}

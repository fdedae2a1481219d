"""`deepseek-vl-jax generate`: answer one prompt about zero or more images, streaming the answer to the terminal.

    deepseek-vl-jax generate --model DIR --image cat.png --prompt "Describe this image." [--max-new-tokens N]
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--dtype bfloat16|float32]

The prompt is one user turn in DeepSeek-VL's chat format (one image placeholder per --image, then the text),
rendered by the processor's chat template. Errors are raised as `UserError`s and reported by `cli.main`.
"""

from __future__ import annotations

import argparse
import sys

from deepseek_vl_jax.generation.session import Session, add_model_arguments, check_image, user_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image to ask about (repeat for several, in order)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")


def run(args: argparse.Namespace) -> int:
    images = [check_image(p) for p in args.image]
    session = Session.from_args(args)
    session.answer([user_message(args.prompt, images)], sys.stdout)
    return 0

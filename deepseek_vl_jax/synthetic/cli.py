"""`deepseek-vl-jax synthetic OUT`: write the synthetic VQA set and a tokenizer/processor directory for it.

OUT must be new or empty unless --force; everything is written into a temporary sibling and renamed into place when
complete (so an interrupted run leaves nothing, and --force leaves no stale pictures of an earlier run)."""

from __future__ import annotations

import argparse
import json
import os

from deepseek_vl_jax.cli_errors import UserError
from deepseek_vl_jax.conversion import atomic
from deepseek_vl_jax.synthetic.dataset import write_dataset
from deepseek_vl_jax.synthetic.tokenizer import write_processor

USES_JAX = False  # no compilation cache needed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="directory for train.jsonl, heldout.jsonl, images/ and processor/")
    p.add_argument("--train", type=int, default=6000, help="training pictures")
    p.add_argument("--questions-per-image", type=int, default=1, help="training questions per picture")
    p.add_argument("--turns", type=int, default=1,
                   help="> 1: each training picture is one chat of up to this many questions, each shape asked about "
                        "at most once (overrides --questions-per-image)")
    p.add_argument("--heldout", type=int, default=300, help="held-out rows")
    p.add_argument("--pretrain", type=int, default=0, help="caption rows (pretrain.jsonl) for pre-training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="the processor's (SigLIP's) input size")
    p.add_argument("--patch-size", type=int, default=8, help="to derive num_image_tokens = (size / patch)^2")
    p.add_argument("--vocab-size", type=int, default=512, help="the tokenizer's vocabulary size (>= 64)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT (once the new set is complete)")


def texts(jsonl: str):
    """Every text item of every message (the tokenizer's training corpus)."""
    with open(jsonl) as f:
        for line in f:
            for m in json.loads(line)["messages"]:
                for item in m["content"]:
                    if item["type"] == "text":
                        yield item["text"]


def check_args(args: argparse.Namespace) -> None:
    for flag, value, least in (("--train", args.train, 1), ("--heldout", args.heldout, 0),
                               ("--pretrain", args.pretrain, 0), ("--questions-per-image", args.questions_per_image, 1),
                               ("--turns", args.turns, 1), ("--image-size", args.image_size, 8),
                               ("--patch-size", args.patch_size, 1), ("--vocab-size", args.vocab_size, 64)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"{args.output} is a file; give a directory for the data set")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.force:
        raise UserError(f"{args.output} is not empty; give a new directory, or --force to replace it")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = os.path.abspath(args.output)
    force = os.path.isdir(out)  # an empty directory, or a non-empty one with --force
    with atomic.staged_directory(out, force=force) as tmp:
        paths = write_dataset(tmp, args.train, args.heldout, args.seed, args.pretrain,
                              args.questions_per_image, args.turns)
        tokens = (args.image_size // args.patch_size) ** 2
        corpus = [t for split in ("train", "pretrain") if split in paths for t in texts(paths[split])]
        tok = write_processor(os.path.join(tmp, "processor"), corpus, args.image_size, tokens, args.vocab_size)
    each = f"chats of up to {args.turns} questions" if args.turns > 1 else f"{args.questions_per_image} questions each"
    print(f"wrote {args.train} train pictures ({each}) and {args.heldout} held-out "
          f"rows to {args.output}; "
          f"tokenizer of {tok.get_vocab_size()} tokens, {tokens} image tokens per picture")
    return 0

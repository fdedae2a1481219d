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
from deepseek_vl_jax.synthetic.questions import QUESTION_KINDS
from deepseek_vl_jax.synthetic.styles import FAMILIES
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
    p.add_argument("--styles", default="grid",
                   help=f"comma-separated drawing-style families of the train/pretrain/heldout splits, from "
                        f"{', '.join(FAMILIES)} (default: grid, the original 2 x 3 layout)")
    p.add_argument("--heldout-styles", default="",
                   help="comma-separated families that each get their own held-out split heldout_<family>.jsonl "
                        "(--heldout rows each); a family not in --styles is never seen in training")
    p.add_argument("--image-size", type=int, default=64, help="the processor's (SigLIP's) input size")
    p.add_argument("--patch-size", type=int, default=8, help="to derive num_image_tokens = (size / patch)^2")
    p.add_argument("--vocab-size", type=int, default=512, help="the tokenizer's vocabulary size (>= 64)")
    p.add_argument("--details", action="store_true",
                   help="fine-detail scenes: a small digit inside each shape and questions about it (for the hybrid "
                        "model, whose high-resolution tower can read them); not with the grid style")
    p.add_argument("--min-shapes", type=int, default=1,
                   help="every picture has at least this many shapes (1..3; e.g. 2: every question must pick out one "
                        "shape among others)")
    p.add_argument("--train-kind", choices=QUESTION_KINDS, default=None,
                   help="every training question is of this kind (with --turns N: up to N per chat, each about a "
                        "different shape; e.g. side: a position-heavy set to mix into a stage's data)")
    p.add_argument("--high-res-size", type=int, default=0,
                   help="> 0: write a DeepSeek-VL-Hybrid processor whose high-resolution (SAM) input has this size")
    p.add_argument("--tokenizer-from", metavar="DIR",
                   help="reuse DIR/tokenizer.json (a trained model's, to start training from its weights) instead of "
                        "training a tokenizer on the set")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT (once the new set is complete)")


def texts(jsonl: str):
    """Every text item of every message (the tokenizer's training corpus)."""
    with open(jsonl) as f:
        for line in f:
            for m in json.loads(line)["messages"]:
                for item in m["content"]:
                    if item["type"] == "text":
                        yield item["text"]


def families(value: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in value.split(",") if f.strip())


def check_args(args: argparse.Namespace) -> None:
    for flag, value, least in (("--train", args.train, 1), ("--heldout", args.heldout, 0),
                               ("--pretrain", args.pretrain, 0), ("--questions-per-image", args.questions_per_image, 1),
                               ("--turns", args.turns, 1), ("--image-size", args.image_size, 8),
                               ("--patch-size", args.patch_size, 1), ("--vocab-size", args.vocab_size, 64)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    for flag, value in (("--styles", args.styles), ("--heldout-styles", args.heldout_styles)):
        for family in families(value):
            if family not in FAMILIES:
                raise UserError(f"{flag}: unknown style family {family!r}; choose from {', '.join(FAMILIES)}")
    if not 1 <= args.min_shapes <= 3:
        raise UserError(f"--min-shapes must be 1, 2 or 3 (a picture holds at most 3 shapes), got {args.min_shapes}")
    if not families(args.styles):
        raise UserError("--styles is empty; name at least one style family")
    if args.details and "grid" in families(args.styles) + families(args.heldout_styles):
        raise UserError("--details draws free layouts only; leave grid out of --styles and --heldout-styles")
    if args.train_kind == "number" and not args.details:
        raise UserError("--train-kind number asks about the digits of --details scenes; add --details")
    if args.high_res_size < 0 or (args.high_res_size and args.high_res_size < args.image_size):
        raise UserError(f"--high-res-size must be 0 or >= --image-size {args.image_size}, got {args.high_res_size}")
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.tokenizer_from and not os.path.isfile(os.path.join(args.tokenizer_from, "tokenizer.json")):
        raise UserError(f"--tokenizer-from {args.tokenizer_from}: no tokenizer.json there; give a model directory")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"{args.output} is a file; give a directory for the data set")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.force:
        raise UserError(f"{args.output} is not empty; give a new directory, or --force to replace it")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = os.path.abspath(args.output)
    force = os.path.isdir(out)  # an empty directory, or a non-empty one with --force
    tokenizer = None
    if args.tokenizer_from:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(args.tokenizer_from, "tokenizer.json"))
    with atomic.staged_directory(out, force=force) as tmp:
        paths = write_dataset(tmp, args.train, args.heldout, args.seed, args.pretrain,
                              args.questions_per_image, args.turns, families(args.styles),
                              families(args.heldout_styles), args.details, args.min_shapes, args.train_kind)
        tokens = (args.image_size // args.patch_size) ** 2
        corpus = [t for split in ("train", "pretrain") if split in paths for t in texts(paths[split])]
        tok = write_processor(os.path.join(tmp, "processor"), corpus, args.image_size, tokens, args.vocab_size,
                              high_res_size=args.high_res_size or None, tokenizer=tokenizer)
    each = f"chats of up to {args.turns} questions" if args.turns > 1 else f"{args.questions_per_image} questions each"
    print(f"wrote {args.train} train pictures ({each}) and {args.heldout} held-out "
          f"rows to {args.output}; "
          f"tokenizer of {tok.get_vocab_size()} tokens, {tokens} image tokens per picture")
    return 0

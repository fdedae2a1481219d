"""The tiny hybrid's data: striped fine-detail scenes (`deepseek_vl_jax.synthetic.stripes`) in the training styles.

    python train/demo_hybrid/make_data.py OUT DONOR_DIR [--train N] [--seed S]

writes into OUT (staged, renamed into place when complete):
- train.jsonl:     N chats of up to 4 questions, one of them "Are the shapes striped or plain?";
- stripes.jsonl:   N / 2 rows asking only about stripes (for probes of the detail alone);
- heldout.jsonl:   300 single questions on striped pictures, kinds drawn uniformly (stripes among them);
- heldout_stripes.jsonl: 200 stripes questions (the fine-detail set the ablation is measured on);
- heldout_plain.jsonl, heldout_gradient.jsonl: 300 ordinary questions on unstriped pictures, in the training styles
  and in the never-trained gradient family (`synthetic.dataset.write_split`, as the tiny model is evaluated);
- processor/:      the hybrid processor (SigLIP 64 px, SAM 128 px) with DONOR_DIR's tokenizer.
Held-out splits come from seeds no training split uses."""

import argparse
import os
import sys

from tokenizers import Tokenizer

from deepseek_vl_jax.conversion import atomic
from deepseek_vl_jax.synthetic.dataset import write_split
from deepseek_vl_jax.synthetic.stripes import STRIPES, write_stripe_split
from deepseek_vl_jax.synthetic.tokenizer import write_processor

FAMILIES = ("solid", "noise")
IMAGE_SIZE, PATCH, HIGH_RES = 64, 16, 128
HELDOUT_SEED = 1_000_003  # + the recipe's seed; the shipped model's tests regenerate these splits from it


def splits(seed: int, train: int) -> dict:
    """name -> (writer, count, seed, keyword arguments): every split the recipe writes."""
    h = seed + HELDOUT_SEED
    return {
        "train": (write_stripe_split, train, seed, {"families": FAMILIES, "turns": 4}),
        "stripes": (write_stripe_split, train // 2, seed + 7, {"families": FAMILIES, "kind": STRIPES}),
        "heldout": (write_stripe_split, 300, h, {"families": FAMILIES}),
        "heldout_stripes": (write_stripe_split, 200, h + 1, {"families": FAMILIES, "kind": STRIPES}),
        "heldout_plain": (write_split, 300, h + 2, {"families": FAMILIES}),
        "heldout_gradient": (write_split, 300, h + 3, {"families": ("gradient",)}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output")
    p.add_argument("donor", help="the model whose tokenizer.json the hybrid shares (its SigLIP and LLaMA donor)")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.donor, "tokenizer.json")):
        print(f"error: no tokenizer.json in {args.donor}; give the donor model's directory", file=sys.stderr)
        return 2
    with atomic.staged_directory(os.path.abspath(args.output), force=os.path.isdir(args.output)) as tmp:
        for name, (writer, count, seed, kwargs) in splits(args.seed, args.train).items():
            writer(tmp, name, count, seed, **kwargs)
        tok = Tokenizer.from_file(os.path.join(args.donor, "tokenizer.json"))
        write_processor(os.path.join(tmp, "processor"), [], IMAGE_SIZE, (IMAGE_SIZE // PATCH) ** 2,
                        high_res_size=HIGH_RES, tokenizer=tok)
    print(f"wrote the hybrid's striped data ({args.train} training chats) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

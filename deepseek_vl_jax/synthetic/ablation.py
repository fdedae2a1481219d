"""Evidence that a hybrid model uses its high-resolution tower: the same held-out evaluation with the tower's
contribution removed.

    python -m deepseek_vl_jax.synthetic.ablation --model DIR --data heldout.jsonl

prints one JSON line: the exact match (overall and per question kind) of the model and of its ablation."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp


def without_high_res(model):
    """The same hybrid model with the high-resolution tower's contribution removed: `high_res_vision_alpha` zeroed
    and the SAM features zeroed (the bias-free last convolution of `high_res_vision_proj` set to zero), so the
    hybrid aligner's high-resolution half sees zeros and adds only its bias. Returns a new `Model`."""
    if not model.config.is_hybrid:
        raise ValueError("not a hybrid model: there is no high-resolution tower to remove")
    params = dict(model.params)
    params["high_res_vision_alpha"] = jnp.zeros_like(params["high_res_vision_alpha"])
    proj = dict(params["high_res_vision_proj"])
    proj["conv2"] = jax.tree.map(jnp.zeros_like, proj["conv2"])
    params["high_res_vision_proj"] = proj
    return dataclasses.replace(model, params=params)


def compare(model, processor, data: str, batch_size: int = 50, max_new_tokens: int = 6) -> dict:
    """{"model": summary, "without_high_res": summary}, each {"exact_match", "rows", "by_kind"} on `data`."""
    from deepseek_vl_jax.training import data as train_data
    from deepseek_vl_jax.training.config import BadRows
    from deepseek_vl_jax.training.evaluate import by_kind, exact_match

    rows = train_data.read_rows(data, 1, BadRows.FAIL).rows
    out = {}
    for name, m in (("model", model), ("without_high_res", without_high_res(model))):
        accuracy, records = exact_match(m, processor, rows, max_new_tokens, batch_size)
        out[name] = {"exact_match": accuracy, "rows": len(records), "by_kind": by_kind(data, records)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m deepseek_vl_jax.synthetic.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a hybrid model directory")
    p.add_argument("--data", required=True, help="held-out JSONL (rows labelled with their question kind)")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    import deepseek_vl_jax as D

    model = D.load_pretrained(args.model, progress=False)
    if not model.config.is_hybrid:
        print(f"error: {args.model} is not a hybrid model; give a DeepSeek-VL-Hybrid directory", file=sys.stderr)
        return 2
    result = compare(model, D.load_processor(args.model), args.data, args.batch_size)
    print(json.dumps({"data": args.data, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

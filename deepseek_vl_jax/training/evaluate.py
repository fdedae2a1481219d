"""`deepseek-vl-jax evaluate`: exact-match accuracy of greedy answers on a held-out JSONL (the training row schema).

    deepseek-vl-jax evaluate --model DIR --data heldout.jsonl [--max-new-tokens 64] [--batch-size 8]
        [--predictions out.jsonl] [--ignore-case]

For every row the chat up to the last assistant message is the prompt; the last assistant message is the reference.
An answer counts when it equals the reference after stripping and collapsing whitespace (and case, with
--ignore-case). Rows with an optional "kind" label (the synthetic set's question kinds) are also counted per kind
("by_kind": {kind: [correct, rows]}). --model is an HF / Flax model directory or a training output directory (its
latest checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, or a `train` output directory")
    p.add_argument("--data", required=True, help="held-out JSONL of chats ending with the reference answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images-per-row", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ignore-case", action="store_true")
    p.add_argument("--predictions", help="write one JSON line per row: line, prediction, reference, correct")
    from deepseek_vl_jax.quantization import cli as quantize_cli
    quantize_cli.add_arguments(p)


def normalize(text: str, ignore_case: bool = False) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if ignore_case else text


def reference_text(message: dict) -> str:
    return " ".join(item["text"] for item in message["content"] if item["type"] == "text")


def load_model(path: str, dtype: str = "float32", mesh=None, quantize=None):
    """A `Model` from a model directory, or from a training output directory's latest checkpoint; `quantize` as in
    `load_pretrained`."""
    from deepseek_vl_jax.training import checkpointing

    if os.path.isdir(os.path.join(path, checkpointing.CHECKPOINTS)):
        import jax
        import orbax.checkpoint as ocp
        from flax.core import meta

        from deepseek_vl_jax import sharding
        from deepseek_vl_jax.config import ModelConfig
        from deepseek_vl_jax.pretrained import Model, abstract_params

        config = ModelConfig.from_pretrained(path, dtype=dtype, param_dtype=dtype)
        boxed = abstract_params(config)
        shapes = meta.unbox(boxed)
        if mesh is not None:
            shapes = checkpointing.abstract(shapes, sharding.param_shardings(boxed, mesh))
        with ocp.CheckpointManager(os.path.join(os.path.abspath(path), checkpointing.CHECKPOINTS)) as mgr:
            step = mgr.latest_step()
            if step is None:
                raise FileNotFoundError(f"{path}/{checkpointing.CHECKPOINTS} holds no finished checkpoint")
            params = mgr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(shapes)))[checkpointing.PARAMS]
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        if quantize is not None:
            from deepseek_vl_jax import quantization
            params = quantization.quantize_params(params, boxed, quantize, dtype, mesh)
        return Model(config, params, mesh)
    from deepseek_vl_jax.pretrained import load_pretrained

    return load_pretrained(path, dtype=dtype, mesh=mesh, quantize=quantize)


def exact_match(model, processor, rows: Sequence, max_new_tokens: int = 64, batch_size: int = 8,
                ignore_case: bool = False) -> tuple[float, list[dict]]:
    """(accuracy, per-row records) of greedy answers against each row's last assistant message."""
    from deepseek_vl_jax.generation import generate

    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [r.messages[:-1] for r in chunk]
        batch = processor(prompts, add_generation_prompt=True, padding_side="left")
        tokens = generate(model, batch, max_new_tokens=max_new_tokens, eos_token_id=processor.eos_token_id,
                          pad_token_id=processor.pad_token_id)
        answers = processor.batch_decode(tokens, skip_special_tokens=True)
        for row, answer in zip(chunk, answers):
            ref = reference_text(row.messages[-1])
            records.append({"line": row.line, "prediction": answer, "reference": ref,
                            "correct": normalize(answer, ignore_case) == normalize(ref, ignore_case)})
    accuracy = sum(r["correct"] for r in records) / max(len(records), 1)
    return accuracy, records


def by_kind(path: str, records: Sequence[dict]) -> dict[str, list[int]]:
    """{kind: [correct, rows]} over the records whose JSONL line carries a "kind" label (empty if none does)."""
    kinds = {}
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                kind = json.loads(text).get("kind")
                if kind is not None:
                    kinds[n] = str(kind)
    out: dict[str, list[int]] = {}
    for r in records:
        if r["line"] in kinds:
            tally = out.setdefault(kinds[r["line"]], [0, 0])
            tally[0] += int(r["correct"])
            tally[1] += 1
    return out


def run(args) -> int:
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.training import data
    from deepseek_vl_jax.training.config import BadRows

    rows = data.read_rows(args.data, args.max_images_per_row, BadRows.SKIP)
    from deepseek_vl_jax.quantization import cli as quantize_cli
    model = load_model(args.model, args.dtype, quantize=quantize_cli.from_args(args))
    processor = load_processor(args.model)
    accuracy, records = exact_match(model, processor, rows.rows, args.max_new_tokens, args.batch_size,
                                    args.ignore_case)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    summary = {"exact_match": accuracy, "correct": sum(r["correct"] for r in records), "rows": len(records),
               "skipped_rows": [e.line for e in rows.bad]}
    kinds = by_kind(args.data, records)
    if kinds:
        summary["by_kind"] = kinds
    print(json.dumps(summary))
    return 0 if records else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="deepseek-vl-jax evaluate")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

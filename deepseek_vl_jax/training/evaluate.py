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
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens, >= 1")
    p.add_argument("--batch-size", type=int, default=8, help="rows answered together, >= 1")
    p.add_argument("--max-images-per-row", type=int, default=8, help="rows with more images are skipped, >= 0")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute dtype")
    p.add_argument("--ignore-case", action="store_true", help="compare answers case-insensitively")
    p.add_argument("--predictions", help="write one JSON line per row: line, prediction, reference, correct")
    from deepseek_vl_jax.quantization import cli as quantize_cli
    quantize_cli.add_arguments(p)


def normalize(text: str, ignore_case: bool = False) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if ignore_case else text


def reference_text(message: dict) -> str:
    return " ".join(item["text"] for item in message["content"] if item["type"] == "text")


def load_model(path: str, dtype: str = "float32", mesh=None, quantize=None):
    """A `Model` from a model directory, a Flax checkpoint or a training output directory's latest checkpoint;
    `quantize` as in `load_pretrained`."""
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
            try:
                record = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                continue  # a bad row: skipped (and reported) by read_rows
            kind = record.get("kind") if isinstance(record, dict) else None
            if kind is not None:
                kinds[n] = str(kind)
    out: dict[str, list[int]] = {}
    for r in records:
        if r["line"] in kinds:
            tally = out.setdefault(kinds[r["line"]], [0, 0])
            tally[0] += int(r["correct"])
            tally[1] += 1
    return out


def check_args(args) -> None:
    from deepseek_vl_jax.cli_errors import UserError

    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                               ("--max-images-per-row", args.max_images_per_row, 0)):
        if value < least:
            raise UserError(f"{flag} must be >= {least}, got {value}")
    if not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file; give the held-out JSONL")
    if not os.path.isdir(args.model) or not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model {args.model}: not a model directory (no config.json); pass an HF directory, a "
                        "converted Flax checkpoint or a `train` output directory")
    if args.predictions and os.path.isdir(args.predictions):
        raise UserError(f"--predictions {args.predictions} is a directory; give a file name")


def run(args) -> int:
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.training import data
    from deepseek_vl_jax.training.config import BadRows

    check_args(args)
    rows = data.read_rows(args.data, args.max_images_per_row, BadRows.SKIP)
    if rows.bad:
        print(f"skipped {len(rows.bad)} bad row(s) of {args.data}: lines {[e.line for e in rows.bad]}",
              file=sys.stderr)
    from deepseek_vl_jax.quantization import cli as quantize_cli
    model = load_model(args.model, args.dtype, quantize=quantize_cli.from_args(args))
    processor = load_processor(args.model)
    accuracy, records = exact_match(model, processor, rows.rows, args.max_new_tokens, args.batch_size,
                                    args.ignore_case)
    if args.predictions:  # written whole or not at all
        tmp = f"{args.predictions}.partial-{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, args.predictions)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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

"""The `deepseek-vl-jax` command: one subcommand per program (generate, chat, convert, export, verify, train, ...).

Each program lives in its own module with `add_arguments(parser)` and `run(args) -> int`; this file only wires
them up, importing a program's module when that subcommand is used (so `--help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "generate": ("deepseek_vl_jax.generation.cli", "answer a prompt about images, streaming the answer"),
    "chat": ("deepseek_vl_jax.generation.chat", "interactive multi-turn chat; attach images with /image PATH"),
    "convert": ("deepseek_vl_jax.conversion.convert", "HF (or original DeepSeek) checkpoint -> Flax checkpoint"),
    "export": ("deepseek_vl_jax.conversion.export", "Flax checkpoint (or training output) -> HF directory"),
    "init": ("deepseek_vl_jax.conversion.init_model", "a new model with random weights, as an HF directory"),
    "verify": ("deepseek_vl_jax.conversion.verify", "compare two checkpoints module by module"),
    "train": ("deepseek_vl_jax.training.cli", "sharded, resumable fine-tuning"),
    "evaluate": ("deepseek_vl_jax.training.evaluate", "exact-match accuracy on a held-out JSONL"),
    "synthetic": ("deepseek_vl_jax.synthetic.cli", "write the synthetic shapes VQA set and its tokenizer"),
    "serve": ("deepseek_vl_jax.serving.cli", "an OpenAI-compatible HTTP server with continuous batching"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="deepseek-vl-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    program = argparse.ArgumentParser(prog=f"deepseek-vl-jax {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(program)
    return int(module.run(program.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())

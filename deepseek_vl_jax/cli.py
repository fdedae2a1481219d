"""The `deepseek-vl-jax` command: one subcommand per program (generate, chat, convert, export, verify, train, ...).

Each program lives in its own module with `add_arguments(parser)` and `run(args) -> int`; this file only wires
them up, importing a program's module when that subcommand is used (so `--help` stays fast), and reports every
error the same way (`cli_errors`: `error: ...` on stderr, exit 2 for user errors, 3 for the environment; the
traceback only with --debug or DEEPSEEK_VL_JAX_DEBUG=1). JAX's persistent compilation cache and the program cache
are on (`cli_runtime`; --no-compile-cache or DEEPSEEK_VL_JAX_COMPILE_CACHE=0 turns them off).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deepseek_vl_jax import cli_errors, cli_runtime

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

GLOBAL_FLAGS = ("--debug", "--no-compile-cache")


class _Help(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none worth saying or already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is False or default is argparse.SUPPRESS or (
            isinstance(default, (list, tuple)) and not default)
        if action.option_strings and "default" not in text and not unsaid:
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error line (`error: ...`, exit 2) instead of usage + `prog: error:`."""

    def error(self, message):
        raise cli_errors.UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _global_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common")
    g.add_argument("--debug", action="store_true",
                   help=f"show the Python traceback of an error (or set {cli_errors.DEBUG_ENV}=1)")
    g.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache nor the program cache (parameter shapes "
                        f"and compiled generation programs) (default: on, in {cli_runtime.default_cache_dir()}; or "
                        f"set {cli_runtime.CACHE_SWITCH_ENV}=0)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = cli_errors.debug_enabled(argv)
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    parser = argparse.ArgumentParser(prog="deepseek-vl-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (see deepseek-vl-jax --help)",
              file=sys.stderr)
        return cli_errors.USER_ERROR
    if not debug:  # Orbax reports through absl what we report once, as an `error:` line (or not at all)
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        program = _Parser(prog=f"deepseek-vl-jax {argv[0]}", description=COMMANDS[argv[0]][1],
                          formatter_class=_Help)
        module.add_arguments(program)
        _global_flags(program)
        args = program.parse_args(argv[1:] + flags)
        if cli_runtime.cache_wanted(args.no_compile_cache) and getattr(module, "USES_JAX", True):
            cli_runtime.enable_compile_cache()
        return int(module.run(args) or 0)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 — every failure becomes one `error:` line
        if debug:
            raise
        return cli_errors.report(e)


if __name__ == "__main__":
    sys.exit(main())

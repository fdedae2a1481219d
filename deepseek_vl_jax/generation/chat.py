"""`deepseek-vl-jax chat`: an interactive multi-turn chat, answers streamed as they are generated.

Commands: `/image PATH` attaches an image to the next message (repeatable), `/reset` starts a new conversation,
`/quit` (or end of input) exits. Every turn re-encodes the whole conversation (prompt-length buckets keep the
number of compilations small).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from deepseek_vl_jax.generation.session import CliError, Session, add_model_arguments, check_image, user_message

HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


def chat_loop(session: Session, stdin: TextIO, stdout: TextIO) -> int:
    messages: list[dict] = []
    pending: list[str] = []
    interactive = stdin.isatty()
    print(HELP, file=stdout)
    while True:
        if interactive:
            stdout.write("User: ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            messages, pending = [], []
            print("(conversation reset)", file=stdout)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(check_image(path))
                print(f"(image {path} attached to the next message)", file=stdout)
            except CliError as e:
                print(f"error: {e}", file=stdout)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}; {HELP}", file=stdout)
            continue
        turn = messages + [user_message(line, pending)]
        stdout.write("Assistant: ")
        stdout.flush()
        try:
            answer = session.answer(turn, stdout)
        except ValueError as e:  # e.g. the conversation no longer fits the model's positions
            print(f"\nerror: {e} (use /reset to start over)", file=stdout)
            continue
        messages = turn + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        pending = []


def run(args: argparse.Namespace) -> int:
    try:
        session = Session.from_args(args)
    except (CliError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return chat_loop(session, sys.stdin, sys.stdout)

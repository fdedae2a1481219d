"""`deepseek-vl-jax chat`: an interactive multi-turn chat, answers streamed as they are generated.

Commands: `/image PATH` attaches an image to the next message (repeatable), `/reset` starts a new conversation,
`/quit` (or end of input, Ctrl-D) exits. On a terminal the input line has readline editing and a history kept
between sessions (`~/.cache/deepseek-vl-jax/chat_history`). Ctrl-C during an answer stops that answer (the
conversation goes on without it); Ctrl-C at the prompt exits. Every turn re-encodes the whole conversation
(prompt-length buckets keep the number of compilations small); when it no longer fits the model's positions, the
oldest turns are left out (and it says so).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from deepseek_vl_jax.cli_errors import UserError
from deepseek_vl_jax.generation.session import Session, add_model_arguments, check_image, user_message

HELP = "commands: /image PATH (attach to the next message), /reset, /quit; Ctrl-C stops an answer"
MIN_ANSWER_TOKENS = 16  # trim old turns until at least this many positions are left for the answer
HISTORY = os.path.join(os.path.expanduser("~"), ".cache", "deepseek-vl-jax", "chat_history")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)


class _Input:
    """Lines from `stdin`: through readline (editing, history) when it is the terminal, else plain reads."""

    def __init__(self, stdin: TextIO, stdout: TextIO):
        self.stdin, self.stdout = stdin, stdout
        self.readline = None
        if stdin is sys.stdin and stdin.isatty():
            try:
                import readline

                self.readline = readline
                os.makedirs(os.path.dirname(HISTORY), exist_ok=True)
                if os.path.isfile(HISTORY):
                    readline.read_history_file(HISTORY)
                readline.set_history_length(1000)
            except (ImportError, OSError):
                pass

    def __call__(self) -> str | None:
        """The next line (stripped), or None at end of input."""
        if self.stdin is sys.stdin and self.stdin.isatty():
            try:
                return input("User: ").strip()
            except EOFError:
                self.stdout.write("\n")
                return None
        line = self.stdin.readline()
        return None if not line else line.strip()

    def close(self) -> None:
        if self.readline is not None:
            try:
                self.readline.write_history_file(HISTORY)
            except OSError:
                pass


def fit(session: Session, messages: list[dict]) -> tuple[list[dict], int]:
    """Leave out the oldest (user, assistant) turns until the prompt leaves room for an answer. Returns (the
    messages to send, how many turns were left out); UserError when the last message alone does not fit."""
    dropped = 0
    while True:
        length = session.prompt_length(messages)
        want = session.max_new_tokens or MIN_ANSWER_TOKENS
        if session.positions - length >= want:
            return messages, dropped
        if len(messages) <= 1:
            raise UserError(f"this message has {length} prompt tokens and the answer needs {want} of the model's "
                            f"{session.positions} positions: shorten it, attach fewer images"
                            + (" or use a smaller --max-new-tokens" if session.max_new_tokens else ""))
        messages = messages[2:]
        dropped += 1


def chat_loop(session: Session, stdin: TextIO, stdout: TextIO) -> int:
    messages: list[dict] = []
    pending: list[str] = []
    read = _Input(stdin, stdout)
    print(HELP, file=stdout)
    try:
        while True:
            try:
                line = read()
            except KeyboardInterrupt:
                stdout.write("\n")
                return 0
            if line is None or line == "/quit":
                return 0
            if not line:
                continue
            if line == "/reset":
                messages, pending = [], []
                print("(conversation reset)", file=stdout)
                continue
            if line == "/image" or line.startswith("/image "):
                path = line[len("/image"):].strip()
                try:
                    pending.append(check_image(path))
                    print(f"(image {path} attached to the next message)", file=stdout)
                except UserError as e:
                    print(f"error: {e}", file=stdout)
                continue
            if line.startswith("/"):
                print(f"unknown command {line.split()[0]!r}; {HELP}", file=stdout)
                continue
            try:
                turn, dropped = fit(session, messages + [user_message(line, pending)])
            except UserError as e:
                print(f"error: {e}", file=stdout)
                continue
            if dropped:
                print(f"(the conversation is longer than the model's {session.positions} positions: the oldest "
                      f"{dropped} turn(s) are left out; /reset starts over)", file=stdout)
            stdout.write("Assistant: ")
            stdout.flush()
            try:
                answer = session.answer(turn, stdout)
            except KeyboardInterrupt:
                print("\n(answer stopped; it is not kept in the conversation)", file=stdout)
                continue
            except UserError as e:
                print(f"\nerror: {e}", file=stdout)
                continue
            messages = turn + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            pending = []
    finally:
        read.close()


def run(args: argparse.Namespace) -> int:
    session = Session.from_args(args)
    return chat_loop(session, sys.stdin, sys.stdout)

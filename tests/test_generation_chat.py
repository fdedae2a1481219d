"""`chat` past the happy path, on the shipped model (256 positions, 16 image tokens a picture): a conversation that
outgrows the positions loses its oldest turns (and says so) instead of failing every turn; Ctrl-C during an answer
stops that answer, not the program; `/image` without a path is named as such; the default max_new_tokens is what
the prompt leaves of the positions."""

import argparse
import io
import os

import pytest

from deepseek_vl_jax.generation import chat
from deepseek_vl_jax.generation.session import DEFAULT_MAX_NEW_TOKENS, Session, user_message

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "models", "deepseek-vl-tiny")
IMAGE = os.path.join(REPO, "examples", "shapes.png")


@pytest.fixture(scope="module")
def session():
    args = argparse.Namespace(model=TINY, processor=None, dtype="float32", max_new_tokens=None, temperature=0.0,
                              top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)
    return Session.from_args(args)


def test_default_budget_is_what_the_prompt_leaves(session):
    n = session.prompt_length([user_message("What color is the circle?", [IMAGE])])
    assert session.budget(n) == min(session.positions - n, DEFAULT_MAX_NEW_TOKENS) == 256 - n
    with pytest.raises(ValueError, match="fills the model's max_position_embeddings=256"):
        session.budget(256)


def test_long_conversation_drops_its_oldest_turns(session, monkeypatch):
    """Ten turns with a picture each (~31 prompt tokens a turn) outgrow 256 positions: from then on each prompt
    leaves out the oldest turns, says so, and still leaves room for an answer. (The answers are stubbed to "red"
    here; the real model answers in test_generation_cli.py.)"""
    prompts = []

    def answer(self, messages, out):
        prompts.append(messages)
        out.write("red\n")
        return "red"

    monkeypatch.setattr(Session, "answer", answer)
    script = "".join(f"/image {IMAGE}\nQuestion {i}?\n" for i in range(10)) + "/quit\n"
    out = io.StringIO()
    assert chat.chat_loop(session, io.StringIO(script), out) == 0
    text = out.getvalue()
    assert text.count("Assistant: red") == 10 and "error:" not in text
    assert "turn(s) are left out; /reset starts over" in text
    firsts = [m[0]["content"][-1]["text"] for m in prompts]
    assert firsts[:3] == ["Question 0?"] * 3 and firsts[-1] != "Question 0?"  # the oldest turns went
    assert all(m[-1]["content"][-1]["text"] == f"Question {i}?" for i, m in enumerate(prompts))  # the newest stays
    for m in prompts:
        assert session.positions - session.prompt_length(m) >= chat.MIN_ANSWER_TOKENS


def test_fit_keeps_the_newest_turns(session):
    turn = [user_message("What color is the circle?", [IMAGE]),
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    messages = turn * 6 + [user_message("How many shapes are there?", [IMAGE])]
    kept, dropped = chat.fit(session, messages)
    assert dropped > 0 and kept == messages[2 * dropped:]
    assert session.positions - session.prompt_length(kept) >= chat.MIN_ANSWER_TOKENS
    assert session.positions - session.prompt_length(messages[2 * (dropped - 1):]) < chat.MIN_ANSWER_TOKENS


def test_ctrl_c_stops_the_answer_not_the_chat(session, monkeypatch):
    calls = []
    real = Session.answer

    def answer(self, messages, out):
        calls.append(len(messages))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, messages, out)

    monkeypatch.setattr(Session, "answer", answer)
    out = io.StringIO()
    assert chat.chat_loop(session, io.StringIO("Hello\nWhat color is the circle?\n/image\n/quit\n"), out) == 0
    text = out.getvalue()
    assert "(answer stopped; it is not kept in the conversation)" in text
    assert calls == [1, 1]  # the stopped turn is not part of the next prompt
    assert "error: no image path given" in text

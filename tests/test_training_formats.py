"""LLaVA JSON and OpenAI-messages JSONL give the same rows, token ids and labels as the equivalent native rows;
their bad rows are reported by line."""

import json
import os

import numpy as np
import pytest

from deepseek_vl_jax.processing import load_processor
from deepseek_vl_jax.training import data
from deepseek_vl_jax.training.config import BadRows

import test_training_helpers as H

NATIVE = [
    [{"role": "user", "content": [{"type": "image", "image": "images/a.png"},
                                  {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
     {"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Hello there."}]},
     {"role": "user", "content": [{"type": "text", "text": "Two?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Two."}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": "images/a.png"},
                                  {"type": "image", "image": "images/b.png"}, {"type": "text", "text": "Which?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]}],
]
LLAVA = [
    {"id": "0", "image": "images/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "1", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Hello there."}, {"from": "human", "value": "Two?"},
        {"from": "gpt", "value": "Two."}]},
    {"id": "2", "images": ["images/a.png", "images/b.png"], "conversations": [
        {"from": "human", "value": "Compare<image><image>\nWhich?"}, {"from": "gpt", "value": "The left one."}]},
]
OPENAI = [
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/a.png"}},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Two?"},
                  {"role": "assistant", "content": "Two."}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                               {"type": "image_url", "image_url": {"url": "images/a.png"}},
                                               {"type": "image_url", "image_url": "images/b.png"},
                                               {"type": "text", "text": "Which?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]}]},
]


@pytest.fixture(scope="module")
def files():
    d = H.scratch("formats")
    for name, seed in (("a", 1), ("b", 2)):
        H.write_image(os.path.join(d, "images", f"{name}.png"), seed)
    paths = {}
    for name, rows in (("native.jsonl", [{"messages": m} for m in NATIVE]), ("openai.jsonl", OPENAI)):
        paths[name] = os.path.join(d, name)
        with open(paths[name], "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    paths["llava.json"] = os.path.join(d, "llava.json")
    with open(paths["llava.json"], "w") as f:
        json.dump(LLAVA, f, indent=2)
    return paths


def test_formats_equal_native_rows(files):
    processor = load_processor(H.model_dir())
    native = data.read_rows(files["native.jsonl"], 2, BadRows.FAIL).rows
    want = [processor.training_example(r.messages) for r in native]
    assert sum(int((w["labels"] != -100).sum()) for w in want) > 0
    for name in ("llava.json", "openai.jsonl"):
        rows = data.read_rows(files[name], 2, BadRows.FAIL).rows
        assert [r.messages for r in rows] == [r.messages for r in native], name
        for r, w in zip(rows, want):
            got = processor.training_example(r.messages)
            np.testing.assert_array_equal(got["input_ids"], w["input_ids"])
            np.testing.assert_array_equal(got["labels"], w["labels"])


def test_bad_rows_reported_by_line(files, tmp_path):
    d = os.path.dirname(files["native.jsonl"])
    bad = [LLAVA[0], {"image": "images/a.png", "conversations": [{"from": "human", "value": "<image><image>x"},
                                                                 {"from": "gpt", "value": "y"}]},
           {"conversations": [{"from": "robot", "value": "x"}]}]
    path = os.path.join(d, "bad_llava.json")
    with open(path, "w") as f:
        json.dump(bad, f, indent=2)
    text = open(path).read().splitlines()
    starts = [i + 1 for i, line in enumerate(text) if line == "  {"]
    result = data.read_rows(path, 2, BadRows.SKIP)
    assert [e.line for e in result.bad] == starts[1:]
    assert "2 <image> placeholder(s) for 1 image(s)" in str(result.bad[0])
    assert "turn 0" in str(result.bad[1])
    path = os.path.join(d, "bad_openai.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(OPENAI[0]) + "\n" + json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                          {"role": "assistant", "content": "z"}]}) + "\n")
    with pytest.raises(data.BadRowError, match=r"bad_openai.jsonl:2: image_url 'https://x/y.png': only local"):
        data.read_rows(path, 2, BadRows.FAIL)

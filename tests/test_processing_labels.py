"""Training labels: only assistant output (+ its end-of-sentence token) is learned, the rest is -100."""

import numpy as np
import pytest

try:
    from processing_fixtures import processor_pair, random_image
except ImportError:
    from tests.processing_fixtures import processor_pair, random_image

from deepseek_vl_jax.processing import IGNORE_INDEX


def runs(labels):
    """Contiguous runs of learned positions as lists of token ids."""
    out, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                out.append(current)
            current = []
        else:
            current.append(value)
    if current:
        out.append(current)
    return out


def hf_ids(hf, chat, add_generation_prompt):
    out = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
    return np.asarray(out["input_ids"]).reshape(-1).tolist()


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_multi_turn_labels(kind):
    hf, ours = processor_pair(kind)
    answers = ["A small cat, sitting.", "它是一只猫 😀 yes!"]
    chat = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": random_image(20, 30)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
        {"role": "user", "content": [{"type": "text", "text": "Say it in Chinese."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "  " + answers[1] + "  "}]},
    ]
    ex = ours.training_example(chat)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.shape == labels.shape == ex["attention_mask"].shape and ids.dtype == np.int32
    assert ex["pixel_values"].shape[0] == 1
    if kind == "hybrid":
        assert ex["high_res_pixel_values"].shape[0] == 1

    # Learned tokens equal the input tokens; everything else is ignored.
    learned = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[learned], ids[learned])
    assert not learned[ids == ours.image_token_id].any()
    assert not learned[0]  # BOS

    # Each assistant turn is learned as " " + its (template-stripped) text + the end-of-sentence token.
    eos = ours.eos_token
    decoded = [ours.decode(run) for run in runs(labels)]
    assert decoded == [" " + answers[0] + eos, " " + answers[1] + eos]

    # input_ids are what transformers tokenises for the full chat, plus the appended final EOS.
    assert ids[:-1].tolist() == hf_ids(hf, chat, add_generation_prompt=False)
    assert ids[-1] == ours.eos_token_id and labels[-1] == ours.eos_token_id

    # The context before each assistant turn is exactly the inference prompt (generation prompt included).
    starts = np.flatnonzero(learned & ~np.concatenate([[False], learned[:-1]]))
    for start, upto in zip(starts, (3, 5)):
        assert ids[:start].tolist() == hf_ids(hf, chat[: upto - 1], add_generation_prompt=True)


def test_single_turn_string_content():
    _, ours = processor_pair("vl")
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, friend."}]
    ex = ours.training_example(chat)
    assert [ours.decode(r) for r in runs(ex["labels"])] == [" Hello, friend." + ours.eos_token]
    assert "pixel_values" not in ex
    n_learned = int((ex["labels"] != IGNORE_INDEX).sum())
    assert 0 < n_learned < len(ex["labels"]) // 2

"""`deepseek_vl_jax.pipeline("image-text-to-text")` against transformers' pipeline on the same model directory:
the same structure and text for one chat and a batch of chats (different lengths and image counts, generated here
as one left-padded batch), with and without return_full_text, both model types; clear errors on bad calls."""

import pytest
from transformers import pipeline as hf_pipeline

import deepseek_vl_jax as D

import processing_fixtures as PF

NEW = 10


def chats():
    one, two = PF.random_image(40, 56, seed=1), PF.random_image(64, 48, seed=2)
    return [
        [{"role": "user", "content": [{"type": "image", "image": one}, {"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": [{"type": "image", "image": one}, {"type": "image", "image": two},
                                      {"type": "text", "text": "What is the difference between these two pictures?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hello there, how are you today?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "I am fine, thank you."}]},
         {"role": "user", "content": [{"type": "image", "image": two}, {"type": "text", "text": "And this?"}]}],
    ]


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_pipeline_matches_transformers(chat_checkpoints, kind):
    ref, _, _, hf_proc, path = chat_checkpoints(kind)
    theirs = hf_pipeline("image-text-to-text", model=ref, processor=hf_proc)
    ours = D.pipeline("image-text-to-text", model=path)
    batch = chats()
    want = theirs(text=batch, max_new_tokens=NEW, return_full_text=False)
    got = ours(text=batch, max_new_tokens=NEW, return_full_text=False)
    assert got == want
    assert len({r[0]["generated_text"] for r in got}) == 3 and all(len(r[0]["generated_text"]) > 3 for r in got)
    want = theirs(text=batch[1], max_new_tokens=NEW)  # one chat, full text: the chat plus the assistant's message
    got = ours(text=batch[1], max_new_tokens=NEW)
    assert got == want and got[0]["generated_text"][-1]["role"] == "assistant"
    assert ours(batch[0], max_new_tokens=NEW, return_full_text=False) == theirs(
        batch[0], max_new_tokens=NEW, return_full_text=False)


def test_pipeline_errors(chat_checkpoints, tmp_path):
    _, model, proc, _, path = chat_checkpoints("vl")
    with pytest.raises(ValueError, match="unsupported task"):
        D.pipeline("text-generation", model=path)
    with pytest.raises(ValueError, match="does not exist"):
        D.pipeline(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="give processor="):
        D.pipeline(model=model)
    pipe = D.pipeline(model=model, processor=proc)
    with pytest.raises(ValueError, match="give the chat"):
        pipe(max_new_tokens=2)
    with pytest.raises(ValueError, match="inside the messages"):
        pipe(text=chats()[0], images=[PF.random_image(8, 8)], max_new_tokens=2)

"""Clear errors: each one is a ValueError subclass whose message names the problem."""

import os

import pytest

try:
    from processing_fixtures import processor_pair, random_image, scratch_dir
except ImportError:
    from tests.processing_fixtures import processor_pair, random_image, scratch_dir

from deepseek_vl_jax.processing import (
    ImageCountError,
    ImageLoadError,
    ProcessorConfigError,
    ProcessorError,
    PromptTooLongError,
    UnsupportedContentError,
    load_processor,
)


@pytest.fixture(scope="module")
def ours():
    return processor_pair("vl")[1]


def chat_with(*items):
    return [{"role": "user", "content": list(items)}]


def test_error_classes_are_value_errors():
    for cls in (ImageCountError, ImageLoadError, UnsupportedContentError, PromptTooLongError, ProcessorConfigError):
        assert issubclass(cls, ProcessorError) and issubclass(cls, ValueError)


def test_more_placeholders_than_images(ours):
    # A literal placeholder typed in the text counts as an image slot (as in transformers), with no image for it.
    chat = chat_with({"type": "text", "text": "look <image_placeholder> here"})
    with pytest.raises(ImageCountError, match=r"1 image placeholder.*0 image"):
        ours(chat)


def test_more_images_than_placeholders(ours):
    chat = chat_with({"type": "image", "image": random_image(8, 8)}, {"type": "text", "text": "hi"})
    with pytest.raises(ImageCountError, match=r"1 image placeholder.*2 image"):
        ours(chat, images=[random_image(8, 8), random_image(9, 9)])


def test_reference_raises_on_count_mismatch_too():
    hf, _ = processor_pair("vl")
    chat = chat_with({"type": "text", "text": "look <image_placeholder> here"})
    with pytest.raises(ValueError):
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_corrupt_image_file_names_the_path(ours):
    path = os.path.join(scratch_dir("errors"), "corrupt.png")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        ours(chat_with({"type": "image", "path": path}, {"type": "text", "text": "what?"}))


def test_truncated_image_file_names_the_path(ours):
    directory = scratch_dir("errors")
    good = os.path.join(directory, "good.jpg")
    random_image(64, 64).save(good, quality=90)
    data = open(good, "rb").read()
    path = os.path.join(directory, "truncated.jpg")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        ours(chat_with({"type": "image", "image": path}))


def test_missing_image_file_names_the_path(ours):
    with pytest.raises(ImageLoadError, match="does_not_exist.png"):
        ours(chat_with({"type": "image", "url": "/nowhere/does_not_exist.png"}))


def test_unsupported_image_object(ours):
    with pytest.raises(ImageLoadError, match="unsupported image object of type int"):
        ours(chat_with({"type": "image", "image": 42}))


def test_unsupported_numpy_dtype(ours):
    import numpy as np

    with pytest.raises(ImageLoadError, match="float32"):
        ours(chat_with({"type": "image", "image": np.zeros((8, 8, 3), np.float32)}))


def test_unsupported_content_type(ours):
    with pytest.raises(UnsupportedContentError, match="unsupported content type 'video'"):
        ours(chat_with({"type": "video", "video": "clip.mp4"}))


def test_malformed_messages(ours):
    with pytest.raises(UnsupportedContentError, match="content must be a string or a list"):
        ours([{"role": "user", "content": 5}])
    with pytest.raises(UnsupportedContentError, match="'role'"):
        ours([{"content": "no role"}])
    with pytest.raises(UnsupportedContentError, match="needs one of the keys"):
        ours(chat_with({"type": "image"}))
    with pytest.raises(UnsupportedContentError, match="non-empty list of messages"):
        ours([])


def test_prompt_too_long_names_the_lengths(ours):
    chat = chat_with({"type": "image", "image": random_image(8, 8)}, {"type": "text", "text": "describe"})
    n = ours(chat)["input_ids"].shape[1]
    assert ours(chat, max_length=n)["input_ids"].shape[1] == n
    with pytest.raises(PromptTooLongError, match=rf"{n} tokens, more than max_length={n - 1}"):
        ours(chat, max_length=n - 1)


def test_training_example_errors(ours):
    with pytest.raises(UnsupportedContentError, match="must end with an assistant message"):
        ours.training_example(chat_with({"type": "text", "text": "hi"}))
    chat = chat_with({"type": "text", "text": "hi"}) + [{"role": "assistant", "content": "hello"}]
    n = len(ours.training_example(chat)["input_ids"])
    with pytest.raises(PromptTooLongError, match=rf"{n} tokens"):
        ours.training_example(chat, max_length=n - 1)


def test_bad_processor_directory():
    with pytest.raises(ProcessorConfigError, match="does not exist"):
        load_processor("/nowhere/at/all")
    with pytest.raises(ProcessorConfigError, match="tokenizer.json"):
        load_processor(scratch_dir("empty_processor_dir"))

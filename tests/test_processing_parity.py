"""Parity of deepseek_vl_jax.processing with transformers' DeepseekVL(Hybrid)Processor (PIL image backend)."""

import numpy as np
import pytest
from PIL import Image

try:
    from processing_fixtures import (
        assert_same_inputs,
        processor_pair,
        random_image,
        reference_inputs,
        scratch_dir,
    )
except ImportError:  # tests/ imported as a package
    from tests.processing_fixtures import (
        assert_same_inputs,
        processor_pair,
        random_image,
        reference_inputs,
        scratch_dir,
    )

KINDS = ["vl", "hybrid"]
SIZES = [(10, 300), (300, 10), (1, 1), (37, 53), (64, 64), (480, 640), (17, 1000)]
MODES = ["RGB", "RGBA", "LA", "P", "P_transparent", "L", "I;16", "I", "F", "CMYK", "1"]


def user(*items):
    return {"role": "user", "content": list(items)}


def text(t):
    return {"type": "text", "text": t}


def image(obj):
    return {"type": "image", "image": obj}


def check(kind, chats, side="left"):
    hf, ours = processor_pair(kind)
    ref = reference_inputs(hf, chats, padding_side=side)
    out = ours(chats, add_generation_prompt=True, padding_side=side)
    assert_same_inputs(ref, out)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_sizes_and_aspect_ratios(kind, size):
    out = check(kind, [user(image(random_image(*size, seed=size[0])), text("Describe this image."))])
    assert out["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_pil_modes(kind, mode):
    chat = [user(image(random_image(23, 41, mode, seed=3)), text("What is it?"), image(random_image(40, 9, mode, seed=4)))]
    out = check(kind, chat)
    assert out["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_inputs(kind):
    rng = np.random.default_rng(7)
    arrays = [
        rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
        rng.integers(0, 256, (30, 50, 4), dtype=np.uint8),  # composited onto white
        rng.integers(0, 256, (30, 50, 1), dtype=np.uint8),  # grayscale
        rng.integers(0, 256, (3, 20, 50), dtype=np.uint8),  # channels-first, as the reference infers
    ]
    check(kind, [user(*[image(a) for a in arrays], text("Compare."))])


@pytest.mark.parametrize("kind", KINDS)
def test_path_inputs(kind):
    directory = scratch_dir("paths")
    paths = []
    for i, (mode, fmt) in enumerate([("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("CMYK", "JPEG")]):
        path = f"{directory}/img{i}.{fmt.lower()}"
        random_image(45, 70, mode, seed=i).save(path, format=fmt)
        paths.append(path)
    # A JPEG with an EXIF orientation tag: the reference (and we) transpose it when loading from a path.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = f"{directory}/rotated.jpg"
    random_image(20, 60, seed=9).save(rotated, exif=exif)
    paths.append(rotated)
    chat = [user(*[{"type": "image", "path": p} for p in paths[:3]], text("Which?"))]
    chat.append({"role": "assistant", "content": [text("The first.")]})
    chat.append(user(*[{"type": "image", "url": p} for p in paths[3:]], text("And these?")))
    out = check(kind, chat)
    assert out["pixel_values"].shape[0] == len(paths)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_padded(kind, side):
    chats = [
        [user(image(random_image(20, 30, seed=1)), text("Short?"))],
        [
            {"role": "system", "content": [text("You answer in one word.")]},
            user(text("What is   in "), image(random_image(33, 12, "RGBA", seed=2)), text("and"), image(random_image(9, 9, seed=3))),
            {"role": "assistant", "content": [text("Cats.")]},
            user(text("你好！Why? 😀")),
        ],
        [user(text("No image at all here, only a somewhat longer piece of text."))],
    ]
    out = check(kind, chats, side=side)
    mask = out["attention_mask"]
    assert mask.shape[0] == 3 and not mask.all()
    padded_col = 0 if side == "left" else -1
    assert mask[:, padded_col].tolist().count(0) >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_multi_turn_with_system_message(kind):
    chat = [
        {"role": "system", "content": [text("Be concise.")]},
        user(image(random_image(50, 20, seed=5)), text("  What is this?  ")),
        {"role": "assistant", "content": [text("A picture.")]},
        user(text("More detail"), text("please.")),
        {"role": "assistant", "content": [text("Random noise.")]},
        user(image(random_image(5, 80, "L", seed=6))),
    ]
    out = check(kind, chat)
    assert out["input_ids"].shape[0] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_text_only_has_no_pixel_values(kind):
    out = check(kind, [user(text("Hello there"))])
    assert "pixel_values" not in out and "high_res_pixel_values" not in out


@pytest.mark.parametrize("kind", KINDS)
def test_real_sizes(kind):
    hf, ours = processor_pair(kind, real=True)
    chats = [
        [user(image(random_image(480, 640, seed=11)), text("Describe."))],
        [user(text("Compare"), image(random_image(300, 10, "RGBA", seed=12)), image(random_image(768, 1024, seed=13)))],
    ]
    ref = reference_inputs(hf, chats, padding_side="left")
    out = ours(chats, padding_side="left")
    assert_same_inputs(ref, out)
    assert out["pixel_values"].shape == (3, 3, 384, 384)
    if kind == "hybrid":
        assert out["high_res_pixel_values"].shape == (3, 3, 1024, 1024)
    assert int((out["input_ids"] == ours.image_token_id).sum()) == 3 * 576


def test_reference_without_convert_rgb_fails_on_rgba_but_matches_on_rgb():
    """HF quirk: DeepseekVLImageProcessor does not set `do_convert_rgb`, so the reference only handles RGB PIL input
    (RGBA, L, P, ... raise inside its pad/normalise). We always convert like `do_convert_rgb=True`."""
    hf, ours = processor_pair("vl", do_convert_rgb=None)
    rgba = [user(image(random_image(20, 30, "RGBA", seed=1)), text("x"))]
    with pytest.raises(ValueError):
        reference_inputs(hf, rgba)
    hf_convert, _ = processor_pair("vl")
    assert_same_inputs(reference_inputs(hf_convert, rgba), ours(rgba))
    rgb = [user(image(random_image(20, 30, seed=1)), text("x"))]
    assert_same_inputs(reference_inputs(hf, rgb), ours(rgb))

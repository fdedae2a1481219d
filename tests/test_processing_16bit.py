"""16-bit greyscale PNGs reach the model with their content: scaled to 8 bits (x / 257), not clipped at 255 into a
white picture, as PIL's convert("RGB") and so transformers' `load_image` do (a documented difference)."""

import numpy as np
import pytest
from PIL import Image

from deepseek_vl_jax.processing.image_processor import load_rgb_image


def picture() -> np.ndarray:
    """[48, 64] uint16: a dark disc on a horizontal ramp over the whole 16-bit range."""
    y, x = np.mgrid[:48, :64]
    ramp = (x / 63 * 65535).astype(np.uint16)
    return np.where((x - 20) ** 2 + (y - 24) ** 2 < 100, np.uint16(1000), ramp)


@pytest.fixture
def png16(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(picture()).save(path)
    assert Image.open(path).mode.startswith("I")  # really stored with 16 bits
    return str(path)


def test_16_bit_png_is_scaled_to_8_bits(png16):
    rgb = np.asarray(load_rgb_image(png16))
    want = np.rint(picture() / 257.0).astype(np.uint8)
    assert rgb.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], want)
    # the content survives: the disc is dark, the ramp rises from black to white
    assert rgb[24, 20, 0] == 4 and rgb[0, 0, 0] == 0 and rgb[0, 63, 0] == 255
    assert len(np.unique(rgb[0, :, 0])) > 50


def test_departs_from_transformers_which_clips_to_white(png16):
    from transformers.image_utils import load_image

    theirs = np.asarray(load_image(png16))
    assert (theirs == 255).mean() > 0.9  # nearly all white: values above 255 clipped
    ours = np.asarray(load_rgb_image(png16))
    assert (ours == 255).mean() < 0.05


def test_8_bit_images_are_unchanged(tmp_path):
    from transformers.image_utils import load_image

    path = tmp_path / "grey8.png"
    Image.fromarray((picture() // 257).astype(np.uint8)).save(path)
    np.testing.assert_array_equal(np.asarray(load_rgb_image(str(path))), np.asarray(load_image(str(path))))

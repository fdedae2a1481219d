"""processing/original.py and the image-processor settings it uses: the original `deepseek` conversation format as
a chat template (rendered identically by this library, by transformers and by the original conversation code), the
converted processor as transformers reads it, per-resolution normalisation, errors."""

import functools
import json
import os
import shutil

import jinja2
import numpy as np
import pytest
from PIL import Image

import deepseek_vl_jax as D
import processing_fixtures as PF
from deepseek_vl_jax.processing import chat_template as ct
from deepseek_vl_jax.processing.original import ORIGINAL_CHAT_TEMPLATE
from original_reference import checkpoints as C
from original_reference import processing as P


def _text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "url": "picture.png"}
# (our chat, the original's conversation without the generation prompt)
CHATS = [
    ([{"role": "user", "content": [IMAGE, _text("Describe this image.")]}],
     [{"role": "User", "content": "<image_placeholder>Describe this image."}]),
    ([{"role": "user", "content": [_text("  a "), IMAGE, _text(" b\n")]},
      {"role": "assistant", "content": [_text(" answer one ")]},
      {"role": "user", "content": "and then?"}],
     [{"role": "User", "content": "  a <image_placeholder> b\n"}, {"role": "Assistant", "content": " answer one "},
      {"role": "User", "content": "and then?"}]),
    ([{"role": "user", "content": [IMAGE, IMAGE, _text("Compare.")]}, {"role": "assistant", "content": "Same."}],
     [{"role": "User", "content": "<image_placeholder><image_placeholder>Compare."},
      {"role": "Assistant", "content": "Same."}]),
    ([{"role": "user", "content": "   "}], [{"role": "User", "content": "   "}]),
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("case", range(len(CHATS)))
def test_chat_template_renders_the_original_conversation_format(case, generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    ours_chat, original = CHATS[case]
    want = P.deepseek_prompt(original + ([{"role": "Assistant", "content": ""}] if generation_prompt else []))
    messages, _ = ct.normalize_chat(ours_chat)
    assert ct.render(ORIGINAL_CHAT_TEMPLATE, messages, add_generation_prompt=generation_prompt) == want
    theirs, _ = render_jinja_template(conversations=[ours_chat], chat_template=ORIGINAL_CHAT_TEMPLATE,
                                      add_generation_prompt=generation_prompt)
    assert theirs[0] == want


def test_chat_template_relies_on_trim_and_lstrip_blocks():
    """Rendered without trim_blocks / lstrip_blocks the multi-line template leaves its layout in the prompt: the
    two tests above would fail on a renderer that forgot them."""
    messages, _ = ct.normalize_chat(CHATS[0][0])
    plain = jinja2.Environment().from_string(ORIGINAL_CHAT_TEMPLATE).render(messages=messages,
                                                                            add_generation_prompt=True)
    assert plain != ct.render(ORIGINAL_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert plain.strip().endswith("Assistant:") and "\n    " in plain


def test_system_message_replaces_the_system_prompt():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    messages, _ = ct.normalize_chat(chat)
    got = ct.render(ORIGINAL_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert got == P.deepseek_prompt([{"role": "User", "content": "Hi"}, {"role": "Assistant", "content": ""}],
                                    system_prompt="Be brief.")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original_dirs):
    """kind -> (original dir, converted dir): the processor files only (weights are not needed here)."""
    @functools.cache
    def get(kind):
        root = tmp_path_factory.mktemp(f"proc{kind}")
        src = original_dirs(kind)
        D.load_processor(src).save_pretrained(str(root / "converted"))  # what convert writes
        return src, str(root / "converted")

    return get


def test_transformers_reads_the_converted_processor(converted):
    """transformers' AutoProcessor on the converted 1.3b processor: the same input ids (its own rendering of the
    chat template) and, for a picture whose resized sides need no rounding, the same pixels. It rounds where the
    original floors (resize_rounding is unknown to it): a 401x250 picture at 32 px is 20 px high there, 19 here."""
    from transformers import AutoProcessor

    src, dst = converted("1.3b")
    hf = AutoProcessor.from_pretrained(dst, backend="pil")
    ours = D.load_processor(dst)
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    chats = [[{"role": "user", "content": [{"type": "image", "image": square}, _text("What is it?")]}],
             [{"role": "user", "content": [_text("Hello")]}]]
    want = hf.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True,
                                  return_tensors="np")
    got = ours(chats, add_generation_prompt=True)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
    assert hf.tokenizer.pad_token_id == ours.eos_token_id and hf.tokenizer.padding_side == "left"
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (250, 401, 3), dtype=np.uint8))
    assert ours.image_processor.geometry(wide)[0].size == (32, 32)
    pil = D.processing.image_processor.resize_longest_side
    assert pil(wide, 32, 14, 3, "floor").size == (32, 19) and pil(wide, 32, 14, 3).size == (32, 20)


def test_hybrid_normalises_each_resolution_with_its_own_tower(converted):
    """7b: SigLIP 0.5 / 0.5 on the low-res image, CLIP mean / std on the high-res one (swapping them fails)."""
    _, dst = converted("7b")
    config = D.load_processor(dst).image_processor.config
    assert config.image_mean == tuple(C.HALF) and config.high_res_image_mean == tuple(C.CLIP_MEAN)
    assert config.low_res_resize == "antialiased_bilinear" and config.resize_rounding == "floor"


def test_hybrid_pil_path_with_distinct_means_matches_transformers():
    """transformers' own hybrid processing (PIL low-res path) with different mean / std per resolution."""
    hf = PF.build_hf_processor(hybrid=True, image_mean=C.HALF, image_std=C.HALF,
                               high_res_image_mean=C.CLIP_MEAN, high_res_image_std=C.CLIP_STD)
    config = D.processing.ImageProcessorConfig.from_dict(hf.image_processor.to_dict(), hybrid=True)
    ours = D.processing.DeepseekVLImageProcessor(config)
    pictures = [Image.fromarray(np.random.default_rng(s).integers(0, 256, (h, w, 3), dtype=np.uint8))
                for s, (w, h) in enumerate(((70, 30), (25, 61)))]
    want = hf.image_processor(pictures, return_tensors="np")
    got = ours(pictures)
    for key in ("pixel_values", "high_res_pixel_values"):
        np.testing.assert_array_equal(got[key], want[key])


def test_unconverted_model_directory_says_to_convert(converted):
    src, _ = converted("1.3b")
    with pytest.raises(D.ConfigError, match=r"original deepseek-ai checkpoint.*deepseek-vl-jax convert"):
        D.load_pretrained(src, progress=False)


def test_original_processor_without_model_config_is_refused(converted, tmp_path):
    src, _ = converted("1.3b")
    copy = shutil.copytree(src, tmp_path / "no_config")
    os.remove(copy / "config.json")
    with pytest.raises(D.processing.ProcessorConfigError, match=r"pixel_mean / pixel_std.*convert"):
        D.load_processor(copy)
    with open(copy / "preprocessor_config.json") as f:
        pre = json.load(f)
    shutil.copy(os.path.join(src, "config.json"), copy / "config.json")
    with open(copy / "preprocessor_config.json", "w") as f:
        json.dump({**pre, "do_normalize": True}, f)
    with pytest.raises(D.processing.ProcessorConfigError, match="normalised twice"):
        D.load_processor(copy)

"""Loading processor directories, attributes, saving, template sources and rendering helpers."""

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers

try:
    from processing_fixtures import (
        CHAT_TEMPLATE,
        assert_same_inputs,
        load_hf_processor,
        processor_dir,
        processor_pair,
        random_image,
        reference_inputs,
        scratch_dir,
    )
except ImportError:
    from tests.processing_fixtures import (
        CHAT_TEMPLATE,
        assert_same_inputs,
        load_hf_processor,
        processor_dir,
        processor_pair,
        random_image,
        reference_inputs,
        scratch_dir,
    )

from deepseek_vl_jax.processing import PROCESSOR_FILES, DEEPSEEK_VL_CHAT_TEMPLATE, load_processor, render


CHAT = [
    {
        "role": "user",
        "content": [{"type": "image", "image": random_image(30, 20, seed=1)}, {"type": "text", "text": "Describe."}],
    }
]


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_attributes_match_reference(kind):
    hf, ours = processor_pair(kind)
    assert isinstance(ours.tokenizer, tokenizers.Tokenizer)
    assert ours.is_hybrid == (kind == "hybrid")
    assert ours.image_token == hf.image_token == "<image_placeholder>"
    assert ours.image_token_id == hf.image_token_id
    assert ours.num_image_tokens == hf.num_image_tokens == 4
    assert ours.bos_token_id == hf.tokenizer.bos_token_id
    assert ours.eos_token_id == hf.tokenizer.eos_token_id
    assert ours.pad_token_id == hf.tokenizer.pad_token_id == ours.eos_token_id
    assert ours.chat_template == hf.chat_template == DEEPSEEK_VL_CHAT_TEMPLATE == CHAT_TEMPLATE
    names = ("input_ids", "attention_mask", "pixel_values") + (("high_res_pixel_values",) if kind == "hybrid" else ())
    assert ours.model_input_names == names


def test_processor_files_cover_the_directory():
    for kind in ("vl", "hybrid"):
        assert set(os.listdir(processor_dir(kind))) <= set(PROCESSOR_FILES)


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
@pytest.mark.parametrize("from_scratch", [False, True])
def test_save_pretrained_round_trip(kind, from_scratch):
    _, ours = processor_pair(kind)
    target = scratch_dir(f"saved_{kind}_{from_scratch}")
    if from_scratch:  # not copying the source files: written from the loaded settings
        ours.source_dir, source = None, ours.source_dir
        try:
            written = ours.save_pretrained(target)
        finally:
            ours.source_dir = source
    else:
        written = ours.save_pretrained(target)
    assert written and all(os.path.isfile(p) for p in written)
    reloaded = load_processor(target)
    assert reloaded.is_hybrid == ours.is_hybrid and reloaded.num_image_tokens == ours.num_image_tokens
    hf = load_hf_processor(target)  # transformers can load what we wrote
    assert_same_inputs(reference_inputs(hf, CHAT), reloaded(CHAT))


def _variant(name, edit):
    """Copy the small vl processor directory and apply `edit(directory)`."""
    target = os.path.join(scratch_dir("variants"), name)
    shutil.copytree(processor_dir("vl"), target, dirs_exist_ok=True)
    edit(target)
    return target


def _edit_json(directory, filename, fn):
    path = os.path.join(directory, filename)
    data = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    fn(data)
    json.dump(data, open(path, "w", encoding="utf-8"), ensure_ascii=False, indent=2)


@pytest.mark.parametrize("source", ["tokenizer_config", "processor_config", "chat_template_json"])
def test_chat_template_sources(source):
    custom = (
        "{% for m in messages %}{{ m['role'] }}>{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image_placeholder>{% else %}{{ c['text'] }}{% endif %}{% endfor %}|{% endfor %}"
    )

    def edit(d):
        os.remove(os.path.join(d, "chat_template.jinja"))
        if source == "tokenizer_config":
            _edit_json(d, "tokenizer_config.json", lambda c: c.update(chat_template=custom))
        elif source == "processor_config":
            _edit_json(d, "processor_config.json", lambda c: c.update(chat_template=custom))
        else:
            _edit_json(d, "chat_template.json", lambda c: c.update(chat_template=custom))

    directory = _variant(f"template_{source}", edit)
    ours = load_processor(directory)
    assert ours.chat_template == custom
    hf = load_hf_processor(directory)
    if source == "tokenizer_config":  # transformers' processor ignores a tokenizer-level template; we fall back to it
        assert hf.chat_template is None
        hf.chat_template = custom
    assert_same_inputs(reference_inputs(hf, CHAT, add_generation_prompt=False), ours(CHAT, add_generation_prompt=False))


def test_legacy_preprocessor_config_and_explicit_bos_flags():
    """Image settings in preprocessor_config.json; add_bos_token/add_eos_token in tokenizer_config are ignored when
    tokenizer.json exists (transformers pops them): its post-processor adds BOS only."""

    def edit(d):
        proc = json.load(open(os.path.join(d, "processor_config.json")))
        image = proc.pop("image_processor")
        image["size"] = {"height": 48, "width": 48}
        json.dump(image, open(os.path.join(d, "preprocessor_config.json"), "w"))
        json.dump(proc, open(os.path.join(d, "processor_config.json"), "w"))
        _edit_json(d, "tokenizer_config.json", lambda c: c.update(add_bos_token=True, add_eos_token=True))

    directory = _variant("legacy", edit)
    ours = load_processor(directory)
    assert ours.image_processor.config.size == 48
    out = ours(CHAT)
    assert out["pixel_values"].shape == (1, 3, 48, 48)
    ids = out["input_ids"][0]
    assert ids[0] == ours.bos_token_id and ids[-1] != ours.eos_token_id
    hf = load_hf_processor(directory)
    assert_same_inputs(reference_inputs(hf, CHAT), out)


def test_string_content_is_treated_as_text():
    """Quirk of the reference: the DeepSeek template iterates `message['content']`, so a plain string renders as
    nothing. We treat a string as a single text item instead (identical to the list form)."""
    hf, ours = processor_pair("vl")
    as_string = [{"role": "user", "content": "What is a cat?"}]
    as_list = [{"role": "user", "content": [{"type": "text", "text": "What is a cat?"}]}]
    assert "What is a cat?" not in hf.apply_chat_template(as_string, add_generation_prompt=True)
    assert "What is a cat?" in ours.render(as_string, add_generation_prompt=True)
    np.testing.assert_array_equal(ours(as_string)["input_ids"], ours(as_list)["input_ids"])
    assert_same_inputs(reference_inputs(hf, as_list), ours(as_string))


def test_openai_image_url_items():
    hf, ours = processor_pair("vl")
    path = os.path.join(scratch_dir("openai"), "x.png")
    random_image(20, 20, "RGBA", seed=3).save(path)
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}}, {"type": "text", "text": "?"}]}]
    out = ours(chat)
    assert out["pixel_values"].shape[0] == 1
    assert_same_inputs(reference_inputs(hf, chat), out)


def test_template_environment_matches_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n  {{ dict(a=1) | tojson(indent=2, sort_keys=True) }}"
        "{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}{{ ns.n }} {{ bos_token }} {{ strftime_now('%Y') }}"
        "{% if boom %}{{ raise_exception('boom!') }}{% endif %}"
    )
    messages = [{"role": "user", "content": "é \"quoted\" <b>"}, {"role": "skip", "content": "x"}] * 3
    ref, _ = render_jinja_template([messages], chat_template=template, bos_token="<s>")
    assert render(template, messages, bos_token="<s>") == ref[0]
    from deepseek_vl_jax.processing import UnsupportedContentError

    with pytest.raises(UnsupportedContentError, match="boom!"):
        render(template, messages, boom=True)

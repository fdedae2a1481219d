"""decode / batch_decode parity and streaming (incremental) detokenisation."""

import numpy as np
import pytest

try:
    from processing_fixtures import processor_pair
except ImportError:
    from tests.processing_fixtures import processor_pair

from deepseek_vl_jax.processing import IncrementalDecoder


TEXTS = [
    "Hello, world! The cat sat.",
    "你好，世界！这是一只猫。",
    "emoji 😀🐱🚀 and café naïve — ok",
    "mixed 中文 text 🎉 with <｜end▁of▁sentence｜> inside",
    "👩‍👩‍👧‍👦 family, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, \u0301 combining",
]
# Characters absent from the fixture tokenizer's training corpus: encoded as several byte-level tokens each.
RARE = ["鲸鱼在海里游泳。", "独角兽 🦄🐉 ✨"]


@pytest.fixture(scope="module")
def pair():
    return processor_pair("vl")


def test_decode_matches_reference(pair):
    hf, ours = pair
    for text in TEXTS:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf.tokenizer(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    batch = [ours.tokenizer.encode(t).ids for t in TEXTS]
    assert ours.batch_decode(batch, skip_special_tokens=True) == hf.batch_decode(batch, skip_special_tokens=True)
    assert ours.decode(np.asarray(batch[0], dtype=np.int32)) == hf.decode(batch[0])


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoding_never_splits_characters(pair, skip):
    _, ours = pair
    for text in TEXTS + RARE:
        ids = ours.tokenizer.encode(text).ids
        full = ours.decode(ids, skip_special_tokens=skip)
        # The tokenizer does split multi-byte characters across tokens (so the test is meaningful) ...
        if text in RARE:
            partial = [ours.decode(ids[:k]) for k in range(1, len(ids))]
            assert any(p.endswith("\ufffd") for p in partial), text
        # ... yet no delta ever contains a replacement character, and the deltas add up to the full decode.
        decoder = ours.incremental_decoder(skip_special_tokens=skip)
        deltas = [decoder.add(i) for i in ids]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + decoder.flush() == full
        assert decoder.flush() == ""


def test_incremental_decoder_on_raw_tokenizer_and_flush(pair):
    _, ours = pair
    text = "猫🦄"  # 🦄 is not in the training corpus: several byte tokens
    ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
    decoder = IncrementalDecoder(ours.tokenizer)
    out = decoder.extend(ids[:-1])
    assert "\ufffd" not in out and len(out) < len(text)
    # a stream cut mid-character is only emitted by flush()
    assert decoder.flush().endswith("\ufffd")
    decoder.reset()
    assert decoder.extend(ids) + decoder.flush() == text

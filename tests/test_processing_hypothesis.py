"""Random chats and images: the processor never crashes — it returns inputs identical to the reference, or (for
deliberately broken input) raises one of its clear ProcessorError types."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from processing_fixtures import assert_same_inputs, processor_pair, random_image, reference_inputs
except ImportError:
    from tests.processing_fixtures import assert_same_inputs, processor_pair, random_image, reference_inputs

from deepseek_vl_jax.processing import ProcessorError


MODES = ["RGB", "RGBA", "LA", "P", "L", "I;16", "CMYK", "1"]
ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list(" \n\t猫😀é<>|"))

text_item = st.builds(lambda t: {"type": "text", "text": t}, st.text(ALPHABET, max_size=20))


@st.composite
def image_item(draw):
    h = draw(st.integers(1, 40))
    w = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 1000))
    if draw(st.booleans()):
        obj = random_image(h, w, draw(st.sampled_from(MODES)), seed=seed)
    else:
        channels = draw(st.sampled_from([1, 3, 4]))
        obj = np.random.default_rng(seed).integers(0, 256, (h + 4, w, channels), dtype=np.uint8)
    return {"type": "image", "image": obj}


BROKEN_ITEMS = [
    {"type": "video", "video": "x.mp4"},
    {"type": "image", "image": "/no/such/file.png"},
    {"type": "image", "image": np.zeros((5, 5, 2), np.uint8)},
    {"type": "text", "text": "a literal <image_placeholder> placeholder"},
    {"type": "image"},
    {"type": "text"},
]

message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "User"]),
        "content": st.lists(st.one_of(text_item, image_item()), min_size=1, max_size=3),
    }
)
chat = st.lists(message, min_size=1, max_size=4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    kind=st.sampled_from(["vl", "hybrid"]),
    chats=st.lists(chat, min_size=1, max_size=3),
    side=st.sampled_from(["left", "right"]),
    broken=st.one_of(st.none(), st.none(), st.sampled_from(range(len(BROKEN_ITEMS)))),
    max_length=st.one_of(st.none(), st.none(), st.none(), st.integers(1, 300)),
)
def test_random_chats(kind, chats, side, broken, max_length):
    hf, ours = processor_pair(kind)
    if broken is not None:
        chats[0][0]["content"].append(BROKEN_ITEMS[broken])
    try:
        out = ours(chats, add_generation_prompt=True, padding_side=side, max_length=max_length)
    except ProcessorError as e:
        assert str(e)
        assert broken is not None or max_length is not None, f"unexpected error on valid input: {e!r}"
        return
    assert broken is None, "broken input was accepted"
    lengths = out["attention_mask"].sum(axis=1)
    assert max_length is None or lengths.max() <= max_length
    assert_same_inputs(reference_inputs(hf, chats, padding_side=side), out)

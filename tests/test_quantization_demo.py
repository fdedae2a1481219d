"""The shipped demo model quantized on load keeps its held-out exact match: int8 within 1 point of float32, int4
(group size 128) within 3 points, on the fixed held-out set of tests/test_demo_model.py.
Measured 2026-12-01 on the stage-5 demo model: float32 90.0%, int8 90.0%, int4 89.5% (200 rows; an earlier demo
model before it: 91.5 / 91.5 / 90.5%)."""

import os

import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax.synthetic.dataset import write_split
from deepseek_vl_jax.training import data as train_data
from deepseek_vl_jax.training.config import BadRows
from deepseek_vl_jax.training.evaluate import exact_match

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "deepseek-vl-tiny")
HELDOUT_SEED = 0 + 1_000_003  # as tests/test_demo_model.py: `synthetic --seed 0`'s held-out split


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = write_split(str(tmp_path_factory.mktemp("heldout")), "heldout", 200, HELDOUT_SEED)
    return train_data.read_rows(path, 1, BadRows.FAIL).rows


def test_quantized_demo_model_keeps_its_exact_match(heldout):
    processor = D.load_processor(MODEL)
    scores = {}
    for scheme in (None, "int8", "int4"):
        model = D.load_pretrained(MODEL, progress=False, quantize=scheme)
        scores[scheme], _ = exact_match(model, processor, heldout, max_new_tokens=6, batch_size=50)
    assert scores[None] >= 0.80, scores
    assert scores["int8"] >= scores[None] - 0.01, scores
    assert scores["int4"] >= scores[None] - 0.03, scores

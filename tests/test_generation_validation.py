"""Sampling settings outside their ranges are rejected before anything runs, by `generate` (the Python API) and by
the CLI (`--temperature` etc., see test_cli_errors.py); the message names each bad value and its range. Where
transformers ignores such a value instead, this is a documented difference (shown here against transformers)."""

import math
import warnings

import numpy as np
import pytest

from deepseek_vl_jax.generation import generate
from deepseek_vl_jax.generation.validation import check_sampling


class Unused:
    """A model that must never be reached: validation comes first."""

    @property
    def config(self):
        raise AssertionError("generate ran past the validation")


BAD = [
    (dict(temperature=-1.0), "temperature=-1.0 is out of range: temperature must be > 0 and finite"),
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf, do_sample=True), "temperature=inf"),
    (dict(top_p=1.5), "top_p=1.5 is out of range: top_p must be in (0, 1]"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_k=-1), "top_k=-1 is out of range: top_k must be >= 0, an integer"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is out of range: repetition_penalty must be > 0 and finite"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is out of range: max_new_tokens must be >= 1, an integer"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_generate_rejects_out_of_range_sampling(kwargs, message):
    batch = {"input_ids": np.ones((1, 3), np.int32)}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        generate(Unused(), batch, **kwargs)


def test_every_bad_value_is_named_once_and_good_values_pass():
    with pytest.raises(ValueError) as e:
        check_sampling(temperature=-1.0, top_p=2.0, top_k=-1, names={"temperature": "--temperature"})
    text = str(e.value)
    assert text.count("out of range") == 3 and text.startswith("--temperature=-1.0")
    check_sampling(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.3, max_new_tokens=np.int64(5))


def test_departs_from_transformers_which_ignores_a_bad_greedy_temperature():
    """transformers accepts temperature=-1 or NaN when greedy (do_sample=False: ignored) and a top_p of 1.5 in its
    GenerationConfig; here each is an error, greedy or not."""
    from transformers import GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(temperature=-1.0, do_sample=False), dict(temperature=math.nan, do_sample=False),
                   dict(top_p=1.5, do_sample=True)):
            GenerationConfig(**kw).validate()  # no error
            with pytest.raises(ValueError, match="out of range"):
                check_sampling(**{k: v for k, v in kw.items() if k != "do_sample"})

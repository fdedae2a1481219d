"""Allowed ranges of the sampling settings, checked before anything compiles.

Departs from transformers on purpose: transformers' `generate` ignores (with a warning) a negative or NaN
temperature when `do_sample=False`, and its GenerationConfig accepts top_p > 1; here any value outside its range is
an error, greedy or not, since it is always a typo (tests/test_generation_validation.py shows both)."""

from __future__ import annotations

import math
import numbers

RANGES = {
    "temperature": "> 0 and finite (with do_sample; the CLI's 0 means greedy)",
    "top_p": "in (0, 1]; 1 turns it off",
    "top_k": ">= 0, an integer; 0 turns it off",
    "repetition_penalty": "> 0 and finite; 1 turns it off",
    "max_new_tokens": ">= 1, an integer",
}


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                   max_new_tokens: int = 1, names: dict[str, str] | None = None) -> None:
    """Raise ValueError naming every setting outside its range (`names` maps a setting to how the user spelt it,
    e.g. {"temperature": "--temperature"})."""
    names = names or {}
    bad = []
    if not (_finite(temperature) and float(temperature) > 0):
        bad.append(("temperature", temperature))
    if not (_finite(top_p) and 0.0 < float(top_p) <= 1.0):
        bad.append(("top_p", top_p))
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        bad.append(("top_k", top_k))
    if not (_finite(repetition_penalty) and float(repetition_penalty) > 0):
        bad.append(("repetition_penalty", repetition_penalty))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        bad.append(("max_new_tokens", max_new_tokens))
    if bad:
        raise ValueError("; ".join(f"{names.get(k, k)}={v!r} is out of range: {names.get(k, k)} must be {RANGES[k]}"
                                   for k, v in bad))

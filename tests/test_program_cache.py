"""program_cache: the stored abstract params equal the traced ones; generation through stored executables gives
the tokens of the jitted programs (greedy and sampled, streamed and not), a second store loads them instead of
tracing (counted: `program_cache.counts()`, `generation.compile_count()`), and a corrupt, stale or unwritable
cache falls back to compiling again with the same tokens."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax import pretrained
from deepseek_vl_jax.generation import loop
from deepseek_vl_jax.program_cache import COUNTS, ProgramStore, store as store_mod

import hf_fixtures as F

SAMPLED = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5)


def stored_programs() -> int:
    """Programs `run_all` stores: prefill and step (greedy, streamed) and the sampled generate: one program, or
    where the CPU policy gives prompts their own options its prefill and decode loop (`loop.SplitGenerate`)."""
    return 3 + (loop.compiler_options(1, prompt=True) != loop.compiler_options(1))


def leaves(tree):
    """(tree structure, [(path, shape, dtype, logical names)]) of a boxed abstract tree."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return treedef, [(path, x.value.shape, x.value.dtype, x.names) if isinstance(x, nn.LogicallyPartitioned)
                     else (path, x.shape, x.dtype, None) for path, x in flat]


def delta(before):
    return {k: v - before.get(k, 0) for k, v in COUNTS.items() if v != before.get(k, 0)}


@pytest.mark.parametrize("kind", ["vl", "hybrid"])
def test_abstract_params_roundtrip(kind, tmp_path):
    config = D.ModelConfig.from_hf(F.make_config(hybrid=kind == "hybrid").to_dict())
    want = leaves(pretrained.abstract_params(config))
    before = dict(COUNTS)
    assert leaves(ProgramStore(tmp_path).abstract_params(config)) == want
    assert leaves(ProgramStore(tmp_path).abstract_params(config)) == want  # a new store: read from the file
    assert delta(before) == {"shapes_saved": 1, "shapes_loaded": 1}
    (shapes,) = [p for p in tmp_path.iterdir() if p.name.endswith(".shapes.json")]
    shapes.write_bytes(shapes.read_bytes()[:-40])  # truncated JSON after a valid header
    before = dict(COUNTS)
    assert leaves(ProgramStore(tmp_path).abstract_params(config)) == want
    assert delta(before) == {"rejected": 1, "shapes_saved": 1}


@pytest.fixture(scope="module")
def case(generation_checkpoints):
    """The model, a two-row batch (left-padded) and the jitted programs' tokens: greedy and streamed (prefill +
    steps, as the CLI runs), and sampled in one program."""
    cfg, _, model, _ = generation_checkpoints("vl")
    batch = F.make_inputs(cfg, rows=((1, 3), (1, 0)), padding="left")
    streamed = Collect()
    reference = {"greedy": G.generate(model, batch, max_new_tokens=12, streamer=streamed),
                 "sampled": G.generate(model, batch, max_new_tokens=12, **SAMPLED)}
    np.testing.assert_array_equal(np.stack(streamed.steps, 1), reference["greedy"][:, :len(streamed.steps)])
    assert len(set(reference["greedy"][0].tolist())) > 3  # the answer wanders: a real comparison
    return model, batch, reference


class Collect:
    def __init__(self):
        self.steps = []

    def __call__(self, tokens):
        self.steps.append(np.asarray(tokens))


def run_all(model, batch, store):
    """Greedy streamed (the prefill and step programs) and sampled (generate), through `store`."""
    streamed = Collect()
    out = {"greedy": G.generate(model, batch, max_new_tokens=12, programs=store.programs, streamer=streamed),
           "sampled": G.generate(model, batch, max_new_tokens=12, programs=store.programs, **SAMPLED)}
    np.testing.assert_array_equal(np.stack(streamed.steps, 1), out["greedy"][:, :len(streamed.steps)])
    return out


@pytest.fixture(scope="module")
def filled(case, tmp_path_factory):
    """A store directory after one run (its outputs and what the cache did)."""
    model, batch, _ = case
    directory = tmp_path_factory.mktemp("programs")
    before = dict(COUNTS)
    out = run_all(model, batch, ProgramStore(directory))
    return directory, out, delta(before)


def copy(directory, tmp_path):
    shutil.copytree(directory, tmp_path / "programs")
    return tmp_path / "programs"


def test_stored_programs_give_the_jitted_tokens(case, filled, tmp_path):
    model, batch, reference = case
    directory, first, did = filled
    assert did == {"programs_saved": stored_programs()}
    directory = copy(directory, tmp_path)
    files = sorted(p.name for p in directory.iterdir())
    before, traces = dict(COUNTS), G.compile_count()
    second = run_all(model, batch, ProgramStore(directory))  # as a fresh process would: every program from disk
    assert delta(before) == {"programs_loaded": stored_programs()} and G.compile_count() == traces
    assert sorted(p.name for p in directory.iterdir()) == files
    for name in reference:
        np.testing.assert_array_equal(first[name], reference[name])
        np.testing.assert_array_equal(second[name], reference[name])


def test_a_corrupt_cache_falls_back(case, filled, tmp_path):
    model, batch, reference = case
    directory = copy(filled[0], tmp_path)
    for i, p in enumerate(sorted(directory.iterdir())):
        data = p.read_bytes()
        p.write_bytes(os.urandom(len(data)) if i == 0 else data[:len(data) // 2])  # garbage, truncated
    before = dict(COUNTS)
    out = run_all(model, batch, ProgramStore(directory))
    assert delta(before) == {"programs_saved": stored_programs(), "rejected": stored_programs()}
    for name in reference:
        np.testing.assert_array_equal(out[name], reference[name])
    before = dict(COUNTS)
    run_all(model, batch, ProgramStore(directory))  # the rewritten files load
    assert delta(before) == {"programs_loaded": stored_programs()}


def test_a_changed_fingerprint_is_another_key(tmp_path, monkeypatch):
    store = store_mod.Store(tmp_path)
    key = store.key("program:step", ident="x")
    assert store.write(key, ".executable", b"payload") and store.read(key, ".executable") == b"payload"
    fixed = store_mod._fixed_fingerprint()
    for field, value in (("source", "edited"), ("jaxlib", "0.0"), ("cpu", "another"), ("xla_flags", "--x")):
        monkeypatch.setattr(store_mod, "_fixed_fingerprint", lambda: {**fixed, field: value})
        assert store.key("program:step", ident="x") != key
        assert store.read(store.key("program:step", ident="x"), ".executable") is None
    monkeypatch.undo()
    assert store.key("program:step", ident="x") == key


def test_an_unwritable_cache_still_generates(case, tmp_path):
    model, batch, reference = case
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    before = dict(COUNTS)
    out = run_all(model, batch, ProgramStore(blocked / "programs"))
    assert "programs_saved" not in delta(before)
    for name in reference:
        np.testing.assert_array_equal(out[name], reference[name])

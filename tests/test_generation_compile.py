"""Compilation behaviour: prompt-length buckets (one compilation for many prompt lengths), values that are traced
(sampling parameters, eos ids, max_new_tokens within a buffer size) do not recompile; seeds reproduce end to end."""

import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax.generation import kv_cache, loop

import hf_fixtures as F


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = F.make_config()
    ref = F.perturb(F.make_model(cfg, seed=1), seed=2, scale=0.2)
    return cfg, D.load_pretrained(F.save(ref, tmp_path_factory.mktemp("vl")), progress=False)


def prompt(cfg, length: int, seed: int, images: int = 1):
    """One row with `images` images and text, `length` tokens in all."""
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(3, F.IMAGE_TOKEN - 1, size=length - images * n_img))
    ids = ids[:1] + [F.IMAGE_TOKEN] * (images * n_img) + ids[1:]
    out = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, length), np.int32)}
    if images:
        v = cfg.vision_config
        out["pixel_values"] = rng.standard_normal((images, 3, v.image_size, v.image_size)).astype(np.float32)
    return out


def generate_programs() -> tuple[str, ...]:
    """The programs one `generate` call compiles: prefill and decode where the CPU policy gives the prompt its own
    options (`loop.SplitGenerate`), else generate's one program."""
    return ("prefill", "decode") if loop.compiler_options(1, prompt=True) != loop.compiler_options(1) else \
        ("generate",)


def test_bucket_lengths():
    assert [kv_cache.bucket_length(n) for n in (1, 64, 65, 128, 129, 600, 700, 1024, 1025, 2049)] == \
        [64, 64, 128, 128, 192, 640, 704, 1024, 1152, 2304]
    assert all(0 <= kv_cache.bucket_length(n) - n < max(64, n / 8) for n in range(1, 9000))
    assert len({kv_cache.bucket_length(n) for n in range(1025, 2049)}) == 8  # 8 buckets per octave
    assert [kv_cache.gen_buffer_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_no_recompilation_within_a_bucket(tiny):
    cfg, model = tiny
    lengths = list(range(20, 40))  # 20 lengths, all in the 64 bucket (each holds one 16-token image)
    outputs = []
    G.generate(model, prompt(cfg, 19, seed=0), max_new_tokens=8)  # compile once
    before = G.compile_count()
    for i, n in enumerate(lengths):
        outputs.append(G.generate(model, prompt(cfg, n, seed=i), max_new_tokens=8 + i % 3))
    assert G.compile_count() == before
    assert len({tuple(o[0, :4]) for o in outputs}) > 5  # they really were different prompts
    # A longer prompt lands in the next bucket: exactly one new compilation (of each of generate's programs:
    # prefill and decode where the CPU policy splits it, `loop.SplitGenerate`), then none.
    parts = generate_programs()
    counts = lambda: [G.compile_count(kind) for kind in parts]
    generate_before = counts()
    G.generate(model, prompt(cfg, 70, seed=0), max_new_tokens=8)
    assert G.compile_count() == before + len(parts) and counts() == [n + 1 for n in generate_before]
    G.generate(model, prompt(cfg, 90, seed=1), max_new_tokens=8)
    assert G.compile_count() == before + len(parts)
    # max_new_tokens past the buffer size (64) needs a longer cache: one more.
    G.generate(model, prompt(cfg, 30, seed=1), max_new_tokens=65)
    assert G.compile_count() == before + 2 * len(parts)


def test_sampling_values_and_eos_do_not_recompile(tiny):
    cfg, model = tiny
    x = prompt(cfg, 30, seed=3)
    G.generate(model, x, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=5, top_p=0.9, seed=0)
    before = G.compile_count()
    for i, (t, k, p) in enumerate([(0.5, 3, 0.5), (1.5, 50, 0.99), (1.1, 1, 0.7)]):
        G.generate(model, x, max_new_tokens=8, do_sample=True, temperature=t, top_k=k, top_p=p, seed=i,
                   eos_token_id=[i, i + 1])
    assert G.compile_count() == before
    G.generate(model, x, max_new_tokens=8, do_sample=True, top_k=5)  # another processor set: a new program
    assert G.compile_count() == before + len(generate_programs())


def test_seed_reproduces_end_to_end(tiny):
    cfg, model = tiny
    x = prompt(cfg, 30, seed=4)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=-1)
    a = G.generate(model, x, seed=11, **kw)
    np.testing.assert_array_equal(a, G.generate(model, x, seed=11, **kw))
    assert (a != G.generate(model, x, seed=12, **kw)).any()
    greedy = G.generate(model, x, max_new_tokens=12, eos_token_id=-1)
    np.testing.assert_array_equal(G.generate(model, x, seed=3, top_k=1, **kw), greedy)  # top-1 sampling = greedy


def while_bodies(hlo: str, carrying: str) -> list[str]:
    """The texts of the body computations of the compiled HLO's while loops whose state holds a `carrying` array."""
    import re

    loops = [line for line in hlo.splitlines() if " while(" in line and carrying in line.split(" while(")[0]]
    bodies = []
    for line in loops:
        start = hlo.index("\n%" + re.search(r"body=%([\w.\-]+)", line).group(1) + " ")
        bodies.append(hlo[start:hlo.index("\n}", start)])
    return bodies


@pytest.mark.parametrize("scan", [False, True])
def test_decode_loop_updates_the_cache_in_place(tiny, monkeypatch, scan):
    """The compiled decode loop copies no KV-cache buffer: each step writes its new keys/values in place, with the
    decoder split per layer (CPU) or scanned over stacked weights and a stacked cache (TPU/GPU). (A dot reading the
    updated cache, or no data dependence from the attention reads to the write, made XLA copy every layer's cache
    at every step: ~25% of a decode step at 0.45B, see benchmarks/bench_generate.py.)"""
    import jax

    from deepseek_vl_jax.generation import inputs as inputs_mod
    from deepseek_vl_jax.generation import loop, sampling, weights

    cfg, model = tiny
    monkeypatch.setattr(weights, "split_on", lambda model: not scan)
    inputs, _ = inputs_mod.prepare_inputs(model, prompt(cfg, 30, seed=0), 8)
    stop = loop.StopParams(eos=np.full((1,), -1, np.int32), pad=np.int32(0), max_new_tokens=np.int32(8))
    progs = loop.programs(model.config, sampling.Sampler(), None)
    hlo = progs.generate.lower(weights.generation_params(model), inputs, jax.random.key(0),
                               sampling.SamplingParams.create(), stop, 64).compile().as_text()
    t = model.config.text
    layers = f"{t.num_hidden_layers}," if scan else ""
    k_shape = f"f32[{layers}1,{t.num_key_value_heads},128,{t.head_dim}]"  # keys: [(L,) B, K, S = 64 + 64, H]
    v_shape = f"f32[{layers}1,{t.num_key_value_heads},{t.head_dim},128]"
    bodies = while_bodies(hlo, k_shape)  # the decode loop (and, scanned, the loops over layers)
    assert len(bodies) == (3 if scan else 1) and all(v_shape in body for body in bodies)
    copies = [line.strip()[:120] for body in bodies for line in body.splitlines() if " copy(" in line and
              (k_shape in line or v_shape in line)]
    assert not copies, copies
    # and the program computes what the default layout does
    tokens, _ = progs.generate(weights.generation_params(model), inputs, jax.random.key(0),
                               sampling.SamplingParams.create(), stop, 64)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(tokens)[:, :8], G.generate(model, prompt(cfg, 30, seed=0), 8))


def test_split_decode_program_keeps_the_cache_in_place(tiny, monkeypatch):
    """Where the prompt and the decode loop are two programs (`loop.SplitGenerate`), the decode program takes the
    prefilled state donated and copies no KV-cache buffer, in its loop or around it: the cache is handed over in
    place."""
    import jax

    from deepseek_vl_jax.generation import inputs as inputs_mod
    from deepseek_vl_jax.generation import loop, sampling, weights

    cfg, model = tiny
    monkeypatch.setattr(loop, "CPU_DOT_POLICY", loop.CpuDotPolicy(prompt=()))
    loop.programs.cache_clear()
    try:
        inputs, _ = inputs_mod.prepare_inputs(model, prompt(cfg, 30, seed=0), 8)
        stop = loop.StopParams(eos=np.full((1,), -1, np.int32), pad=np.int32(0), max_new_tokens=np.int32(8))
        progs = loop.programs(model.config, sampling.Sampler(), None)
        params, sp = weights.generation_params(model), sampling.SamplingParams.create()
        args = (params, inputs, jax.random.key(0), sp, stop, 64)
        assert progs.generate.splits(*args)
        state = progs.prefill(*args)
        hlo = progs.decode.lower(params, state, sp, stop).compile().as_text()
    finally:
        loop.programs.cache_clear()
    t = model.config.text
    k_shape = f"f32[1,{t.num_key_value_heads},128,{t.head_dim}]"
    v_shape = f"f32[1,{t.num_key_value_heads},{t.head_dim},128]"
    assert len(while_bodies(hlo, k_shape)) == 1
    copies = [line.strip()[:120] for line in hlo.splitlines() if " copy(" in line and (k_shape in line or
                                                                                       v_shape in line)]
    assert not copies, copies
    assert "input_output_alias" in hlo  # the donated state is the result's buffers

"""The CPU generation programs compile with the dot path `loop.CPU_DOT_POLICY` chooses for their batch size and
kind: the default (the prompt program with YNNPACK dots, the decode loop and step without, so generate runs as two
programs), a policy with YNNPACK dots from 8 rows, and split programs, in the jitted programs and in the ones
program_cache compiles and stores. Read from the compiled HLO text, not from timing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_vl_jax as D
from deepseek_vl_jax import generation as G
from deepseek_vl_jax.generation import kv_cache, loop, sampling, weights
from deepseek_vl_jax.program_cache import ProgramStore

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU compiler options")

YNN = '"kind":"__ynn_fusion"'


@pytest.fixture(scope="module")
def model():
    text = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    vision = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "vision_use_head": False}
    config = D.ModelConfig.from_hf({"model_type": "deepseek_vl", "text_config": text, "vision_config": vision,
                                    "image_token_id": 150})
    return D.Model(config, D.init_params(config, jax.random.key(0)))


def batch(rows: int) -> dict:
    ids = np.random.default_rng(rows).integers(3, 140, size=(rows, 40))
    return {"input_ids": ids, "attention_mask": np.ones((rows, 40), np.int32)}


def args(model, rows: int):
    inputs = {"input_ids": jnp.asarray(batch(rows)["input_ids"], jnp.int32),
              "attention_mask": jnp.ones((rows, 64), jnp.int32)}
    inputs["input_ids"] = jnp.pad(inputs["input_ids"], ((0, 0), (24, 0)), constant_values=3)
    stop = loop.StopParams(eos=jnp.full((8,), -1, jnp.int32), pad=jnp.int32(0), max_new_tokens=jnp.int32(8))
    return (weights.generation_params(model), inputs, jax.random.key(0), sampling.SamplingParams.create(), stop,
            kv_cache.gen_buffer_length(8))


OFF = dict(loop.YNN_DOTS_OFF)


def test_the_policy_is_the_measured_choice():
    """benchmarks/results/cpu_dot_options.json: YNNPACK dots slowed batch-8 decode steps on every native CPU measured
    (a Xeon with AVX-512: 1.23-1.62x; a native AVX2 AMD EPYC: 2.32x) and left the prompt programs no slower; the
    second program of a split generate costs a dispatch (`split cost`). So no decoding program has them, at any
    size, and the prompt program keeps them."""
    policy = loop.CPU_DOT_POLICY
    assert policy.options(1) == policy.options(8) == policy.options(64) == OFF
    assert policy.options(1, prompt=True) == policy.options(8, prompt=True) == {}
    assert loop.compiler_options(8) == loop.compiler_options() == OFF
    assert loop.compiler_options(8, prompt=True) == {}


@pytest.fixture
def ynn_from_8_rows(monkeypatch):
    """`loop.programs` under a policy with XLA's defaults (YNNPACK dots) from 8 rows."""
    monkeypatch.setattr(loop, "CPU_DOT_POLICY", loop.CpuDotPolicy(many_rows=()))
    loop.programs.cache_clear()
    yield
    loop.programs.cache_clear()


def compiled_texts(model, rows: int) -> list[str]:
    """The compiled HLO of the generate, prefill and step programs for a batch of `rows`."""
    progs = loop.programs(model.config, sampling.Sampler(), None)
    a = args(model, rows)
    state = progs.prefill(*a)
    return [progs.generate.lower(*a).compile().as_text(), progs.prefill.lower(*a).compile().as_text(),
            progs.step.lower(a[0], state, a[3], a[4]).compile().as_text()]


@pytest.mark.parametrize("rows", [1, 8])
def test_default_programs_dot_paths(model, policy, rows):
    """generate's one-program form and the step: no YNNPACK dots at any batch size; the prefill program: YNNPACK
    dots."""
    policy(loop.CpuDotPolicy(prompt=()))
    assert [YNN in text for text in compiled_texts(model, rows)] == [False, True, False]


@pytest.mark.parametrize("rows, ynn", [(1, False), (8, True)])
def test_programs_compile_with_their_batch_sizes_dot_path(model, ynn_from_8_rows, rows, ynn):
    assert [YNN in text for text in compiled_texts(model, rows)] == [ynn] * 3


def test_stored_programs_take_the_same_options(model, ynn_from_8_rows, tmp_path):
    store = ProgramStore(tmp_path)
    extras = loop.Extras()
    for rows, ynn in ((1, False), (8, True)):
        tokens = G.generate(model, batch(rows), max_new_tokens=4, eos_token_id=-1, programs=store.programs)
        np.testing.assert_array_equal(tokens, G.generate(model, batch(rows), max_new_tokens=4, eos_token_id=-1))
        stored = store.programs(model.config, sampling.Sampler(), None, extras).generate.whole  # (not split)
        texts = [entry[0].as_text() for entry in stored.memo.values()
                 if entry is not None and entry[0].__class__.__name__ == "Compiled"]
        assert texts and (YNN in texts[-1]) == ynn


@pytest.fixture
def policy(monkeypatch):
    """Set `loop.CPU_DOT_POLICY` for the programs made in the test (the program caches cleared around it)."""
    def use(p):
        monkeypatch.setattr(loop, "CPU_DOT_POLICY", p)
        loop.programs.cache_clear()
    yield use
    loop.programs.cache_clear()


def test_a_split_generate_equals_the_one_program(model, policy):
    """Prompt options other than the decode's: generate runs the prefill program, then the decode loop as a second
    program. With the same kernels in both (YNNPACK dots off; the decode's options differ from the prompt's only by
    one that changes no kernel: fast math off, XLA's default), the two programs give the one program's tokens and
    log-probabilities bit for bit; the prompt is traced once, in the prefill program. (Not YNNPACK on for 1-row
    decode dots: those are XLA's own kernels on an AVX-512 host, but not on a native AVX2 one, 1 ulp apart.)"""
    a = args(model, 1)
    policy(loop.CpuDotPolicy(prompt=None))  # one program, YNNPACK dots off
    assert not loop.programs(model.config, sampling.Sampler(), None).generate.splits(*a)
    want = G.generate(model, batch(1), max_new_tokens=6, eos_token_id=-1, return_dict=True, top_logprobs=2)
    same_kernels = loop.YNN_DOTS_OFF + (("xla_cpu_enable_fast_math", False),)
    policy(loop.CpuDotPolicy(few_rows=same_kernels, many_rows=same_kernels, prompt=loop.YNN_DOTS_OFF))
    progs = loop.programs(model.config, sampling.Sampler(), None)
    assert progs.generate.splits(*a) and progs.prefill.options(*a) == dict(loop.YNN_DOTS_OFF)
    before = {k: loop.compile_count(k) for k in ("generate", "prefill", "decode")}
    got = G.generate(model, batch(1), max_new_tokens=6, eos_token_id=-1, return_dict=True, top_logprobs=2)
    assert {k: loop.compile_count(k) - v for k, v in before.items()} == {"generate": 0, "prefill": 1, "decode": 1}
    for name in ("sequences", "logprobs", "lengths", "top_logprob_ids", "top_logprobs"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert got.finish_reasons == want.finish_reasons


@pytest.mark.parametrize("rows", [1, 8])
def test_a_prompt_with_ynnpack_dots_before_a_decode_loop_without(model, policy, rows):
    """`CpuDotPolicy(prompt=())`: the prefill program compiles with YNNPACK dots, the decode loop (and the step)
    without, at both sizes; the greedy tokens are the one program's (YNNPACK dots off; the prompt's logits differ
    by rounding)."""
    policy(loop.CpuDotPolicy(prompt=None))
    want = G.generate(model, batch(rows), max_new_tokens=6, eos_token_id=-1, return_dict=True)
    policy(loop.CpuDotPolicy(prompt=()))
    progs = loop.programs(model.config, sampling.Sampler(), None)
    a = args(model, rows)
    assert progs.generate.splits(*a)
    state = progs.prefill(*a)
    texts = [progs.prefill.lower(*a).compile().as_text(), progs.decode.lower(a[0], state, a[3], a[4]).compile()
             .as_text(), progs.step.lower(a[0], state, a[3], a[4]).compile().as_text()]
    assert [YNN in text for text in texts] == [True, False, False]
    got = G.generate(model, batch(rows), max_new_tokens=6, eos_token_id=-1, return_dict=True)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)


def test_stored_split_programs(model, policy, tmp_path):
    """program_cache under a splitting policy stores the prefill and decode programs (not the one-program form),
    a fresh store loads them without tracing, and both give the jitted split's tokens."""
    from deepseek_vl_jax.program_cache import COUNTS

    policy(loop.CpuDotPolicy(prompt=()))
    want = G.generate(model, batch(1), max_new_tokens=4, eos_token_id=-1)
    for expect in ({"programs_saved": 2}, {"programs_loaded": 2}):
        before, traces = dict(COUNTS), loop.compile_count()
        tokens = G.generate(model, batch(1), max_new_tokens=4, eos_token_id=-1,
                            programs=ProgramStore(tmp_path).programs)
        assert {k: v - before.get(k, 0) for k, v in COUNTS.items() if v != before.get(k, 0)} == expect
        if "programs_loaded" in expect:
            assert loop.compile_count() == traces
        np.testing.assert_array_equal(tokens, want)


def ynn_dot_names(hlo_text: str) -> list[str]:
    """The op_name of each dot inside a YNNPACK fusion's computation of a compiled program (the fusion itself
    carries none)."""
    import re

    bodies = {re.search(r"calls=%([\w.\-]+)", line).group(1) for line in hlo_text.splitlines() if YNN in line}
    names, computation = [], None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*%([\w.\-]+) \(.*\{\s*$", line)
        if head:
            computation = head.group(1)
        elif computation in bodies and " dot(" in line:
            names += re.findall(r'op_name="([^"]*)"', line)
    return names


def test_the_image_encoder_takes_the_prompt_programs_dots(model):
    """The image encoder runs inside the prefill program, so under the default policy its dots (SigLIP's
    projections and the aligner's) are YNNPACK fusions like the decoder prompt's; the decode step has none."""
    c = model.config
    ids = np.array([[1] + [c.image_token_id] * c.num_image_tokens + [5, 6, 7]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    inputs, _ = G.inputs.prepare_inputs(model, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                "pixel_values": pixels}, 8)
    a = args(model, 1)
    a = (a[0], {k: jnp.asarray(v) for k, v in inputs.items()}) + a[2:]
    progs = loop.programs(c, sampling.Sampler(), None)
    names = ynn_dot_names(progs.prefill.lower(*a).compile().as_text())
    assert any("vision_model" in n for n in names) and any("aligner" in n for n in names)
    assert any("_proj/dot_general" in n and "LlamaBlock" in n for n in names)
    state = progs.prefill(*a)
    assert ynn_dot_names(progs.step.lower(a[0], state, a[3], a[4]).compile().as_text()) == []

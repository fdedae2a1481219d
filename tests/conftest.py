"""Test session setup: 8 simulated CPU devices (before jax is imported), float32 matmuls at full precision, and
JAX's persistent compilation cache in ~/.cache/deepseek-vl-jax/tests (or $DEEPSEEK_VL_JAX_TEST_CACHE), also for the
CLI processes the tests start (DEEPSEEK_VL_JAX_CACHE_DIR), so a rerun compiles little. Compilation counters
(`generation.compile_count`) count traces, which the cache does not skip."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CACHE = os.environ.get("DEEPSEEK_VL_JAX_TEST_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "deepseek-vl-jax", "tests")
os.environ.setdefault("DEEPSEEK_VL_JAX_CACHE_DIR", CACHE)

import torchvision_ops  # noqa: E402

torchvision_ops.ensure_importable()  # before anything imports torchvision (see torchvision_ops)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
try:
    os.makedirs(CACHE, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
except OSError:  # an unwritable home: no cache
    pass


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def generation_checkpoints(tmp_path_factory):
    """Tiny checkpoints for generation tests, built once per session: `get("vl" | "hybrid")` ->
    (hf config, transformers model, our Model, path). An extra perturbation (scale 0.2) makes greedy decoding
    wander over many tokens instead of repeating one."""
    import deepseek_vl_jax as D
    import hf_fixtures as F

    cache = {}

    def get(kind):
        if kind not in cache:
            cfg = F.make_config(hybrid=kind == "hybrid")
            ref = F.perturb(F.make_model(cfg, seed=3), seed=7, scale=0.2)
            path = F.save(ref, tmp_path_factory.mktemp(kind))
            cache[kind] = (cfg, ref, D.load_pretrained(path, progress=False), path)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def serving_models(tmp_path_factory):
    """Tiny model directories with processors for the serving tests, built once: `get("vl" | "hybrid")` ->
    (path, Model, processor)."""
    import deepseek_vl_jax as D
    import serving_fixtures as S
    from deepseek_vl_jax.processing import load_processor

    cache = {}

    def get(kind):
        if kind not in cache:
            path = S.build_model_dir(tmp_path_factory.mktemp(f"serve_{kind}"), kind)
            cache[kind] = (path, D.load_pretrained(path, progress=False), load_processor(path))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def serving_engine(serving_models):
    """Started engines over `serving_models`, shared by the serving tests: `get(kind, max_batch, mesh=None)` ->
    Engine (prefill chunk 16, 256 positions). Stopped at the end of the session."""
    from deepseek_vl_jax import load_pretrained, sharding
    from deepseek_vl_jax.serving import Engine, EngineConfig

    cache = {}

    def get(kind, max_batch=16, mesh=None):
        key = (kind, max_batch, None if mesh is None else tuple(sorted(mesh.items())))
        if key not in cache:
            path, model, proc = serving_models(kind)
            if mesh is not None:
                model = load_pretrained(path, mesh=sharding.make_mesh(**mesh), progress=False)
            config = EngineConfig(max_batch=max_batch, prefill_chunk=16, max_seq_len=256, max_queue=64)
            cache[key] = Engine(model, proc, config).start()
        return cache[key]

    yield get
    for engine in cache.values():
        engine.stop()


@pytest.fixture(scope="session")
def chat_checkpoints(tmp_path_factory):
    """Tiny model directories with a real (tiny byte-level BPE) tokenizer and processor, built once per session:
    `get("vl" | "hybrid")` -> (transformers model, our Model, our processor, transformers processor, path). The
    model's vocabulary, image token and bos/eos/pad ids fit the tokenizer; 16 tokens per image."""
    import deepseek_vl_jax as D
    import hf_fixtures as F
    import processing_fixtures as PF
    from deepseek_vl_jax.processing import load_processor

    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(f"chat_{kind}")
            PF.make_processor_dir(path, hybrid=kind == "hybrid", num_image_tokens=16, image_size=32, high_res_size=64)
            proc = load_processor(path)
            vocab = -(-proc.tokenizer.get_vocab_size() // 32) * 32
            cfg = F.make_config(hybrid=kind == "hybrid", text={
                "vocab_size": vocab, "bos_token_id": proc.bos_token_id, "eos_token_id": proc.eos_token_id,
                "pad_token_id": proc.pad_token_id})
            cfg.image_token_id = proc.image_token_id
            ref = F.perturb(F.make_model(cfg, seed=2), seed=9, scale=0.2)
            F.save(ref, path)
            cache[kind] = (ref, D.load_pretrained(path, progress=False), proc, PF.load_hf_processor(path), str(path))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def original_dirs(tmp_path_factory):
    """Reduced-size original deepseek-ai directories saved from the independent reference, built once per session:
    `get("1.3b" | "7b")` -> path (read-only: tests that change files work on a copy)."""
    from original_reference import checkpoints as C

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = C.make_original_dir(tmp_path_factory.mktemp(f"orig{kind}") / "orig", kind)
        return cache[kind]

    return get

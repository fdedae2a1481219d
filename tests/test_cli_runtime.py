"""The CLI's caches: a second `generate` in a fresh process traces nothing (the parameter shapes and the compiled
generation programs come from `program_cache`, the other programs from JAX's persistent compilation cache),
counted with the program cache's counters, the generation trace counter, JAX's cache-hit / cache-miss monitoring
events and the cache directories' entries, not timed; it gives the same answer as a run without caches, and the
caches can be turned off."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "models", "deepseek-vl-tiny")

# the CLI in a fresh process, counting the cache's hits and misses while it runs
CODE = """
import json, sys
from deepseek_vl_jax.cli_runtime import CacheCounter
counter = CacheCounter().register()
from deepseek_vl_jax import cli
rc = cli.main(sys.argv[1:])
from deepseek_vl_jax import program_cache
from deepseek_vl_jax.generation import loop
print(json.dumps({"rc": rc, "hits": counter.hits, "misses": counter.misses, "traces": loop.compile_count(),
                  **program_cache.counts()}), file=sys.stderr)
"""
ARGS = ["generate", "--model", TINY, "--image", os.path.join(REPO, "examples", "shapes.png"), "--prompt",
        "What color is the circle?", "--max-new-tokens", "4"]


def run(cache_dir, *extra, env=None):
    env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")},
           "DEEPSEEK_VL_JAX_CACHE_DIR": str(cache_dir), **(env or {})}
    p = subprocess.run([sys.executable, "-c", CODE, *ARGS, *extra], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=300)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    assert stats["rc"] == 0, p.stderr
    return p.stdout, stats


def entries(d):
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_second_generate_hits_the_persistent_cache(tmp_path):
    cache = tmp_path / "cache"
    out1, first = run(cache)
    # the shapes and the prefill and step programs are made and stored; everything else compiles into JAX's cache
    assert first["hits"] == 0 and first["misses"] > 2 and first["traces"] == 2
    assert first["shapes_saved"] == 1 and first["programs_saved"] == 2
    written, stored = entries(cache), entries(cache / "programs")
    assert len(written) >= first["misses"] - 2 > 0 and len(stored) == 3
    out2, second = run(cache)
    assert second["traces"] == 0 and second["shapes_loaded"] == 1 and second["programs_loaded"] == 2
    assert "shapes_saved" not in second and "programs_saved" not in second and "rejected" not in second
    # JAX's cache: no miss, and a hit for each program the first run compiled but did not store
    assert second["misses"] == 0 and second["hits"] == first["misses"] - 2
    assert entries(cache) == written and entries(cache / "programs") == stored  # nothing new
    assert out2 == out1 and out1.strip()
    # off by flag: nothing read or written, every program traced; the same answer
    off = tmp_path / "off"
    out3, third = run(off, "--no-compile-cache")
    assert third["hits"] == third["misses"] == 0 and third["traces"] == 2 and not off.exists() and out3 == out1
    assert not {"shapes_loaded", "programs_loaded", "shapes_saved", "programs_saved"} & set(third)


def test_cache_switch(monkeypatch):
    from deepseek_vl_jax import cli_runtime

    assert cli_runtime.cache_wanted() and not cli_runtime.cache_wanted(flag_off=True)
    for value in ("0", "off", "false"):
        monkeypatch.setenv(cli_runtime.CACHE_SWITCH_ENV, value)
        assert not cli_runtime.cache_wanted()
    monkeypatch.setenv(cli_runtime.CACHE_DIR_ENV, "/somewhere/else")
    assert cli_runtime.default_cache_dir() == "/somewhere/else"

"""The CLI's persistent compilation cache: a second `generate` in a fresh process loads every program from the
cache (counted with JAX's cache-hit / cache-miss monitoring events, and by the cache directory's entries, not
timed), gives the same answer, and the cache can be turned off."""

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
print(json.dumps({"rc": rc, "hits": counter.hits, "misses": counter.misses}), file=sys.stderr)
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
    assert first["hits"] == 0 and first["misses"] > 0
    written = entries(cache)
    assert len(written) >= first["misses"] > 0
    out2, second = run(cache)
    assert second["misses"] == 0 and second["hits"] == first["misses"]
    assert entries(cache) == written  # nothing new compiled
    assert out2 == out1 and out1.strip()
    # off by flag: nothing read or written
    off = tmp_path / "off"
    out3, third = run(off, "--no-compile-cache")
    assert third["hits"] == third["misses"] == 0 and not off.exists() and out3 == out1


def test_cache_switch(monkeypatch):
    from deepseek_vl_jax import cli_runtime

    assert cli_runtime.cache_wanted() and not cli_runtime.cache_wanted(flag_off=True)
    for value in ("0", "off", "false"):
        monkeypatch.setenv(cli_runtime.CACHE_SWITCH_ENV, value)
        assert not cli_runtime.cache_wanted()
    monkeypatch.setenv(cli_runtime.CACHE_DIR_ENV, "/somewhere/else")
    assert cli_runtime.default_cache_dir() == "/somewhere/else"

"""Wall time of a repeat `deepseek-vl-jax generate` on the shipped model, in fresh processes, before and after the
persistent compilation cache.

    python benchmarks/bench_cli.py [--runs 3]

"before" is what every run cost until the CLI turned JAX's persistent compilation cache on: `--no-compile-cache`,
every program compiled again. "after" is a repeat run with the cache warm (one untimed run fills it first). Runs
alternate (before, after, before, ...) so both see the same machine load; wall and CPU (user + sys) seconds of each
child are kept, with the load average, since this 2-core machine is shared. Also the bare import time of the CLI
and the cache hits / misses of each run (JAX's monitoring events). Writes benchmarks/results/cli.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "deepseek-vl-tiny")
ARGS = ["generate", "--model", MODEL, "--image", os.path.join(ROOT, "examples", "shapes.png"), "--prompt",
        "What color is the circle?", "--max-new-tokens", "16"]
CODE = """
import json, sys
from deepseek_vl_jax.cli_runtime import CacheCounter
counter = CacheCounter().register()
from deepseek_vl_jax import cli
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "hits": counter.hits, "misses": counter.misses}), file=sys.stderr)
"""


def timed(argv: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"run failed: {p.stderr[-2000:]}")
    out = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "stdout": p.stdout.strip()}
    lines = p.stderr.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        out.update({k: v for k, v in json.loads(lines[-1]).items() if k != "rc"})
    return out


def summary(runs: list[dict]) -> dict:
    return {"wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
            "wall_s_min": round(min(r["wall_s"] for r in runs), 3),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 3), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="bench_cli_cache_")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env.update(DEEPSEEK_VL_JAX_CACHE_DIR=cache, PYTHONPATH=ROOT)
    py = [sys.executable, "-c", CODE]
    load = [os.getloadavg()[0]]
    imports = [timed([sys.executable, "-c", "import deepseek_vl_jax.cli"], env) for _ in range(args.runs)]
    warm = timed(py + ARGS, env)  # fills the cache
    before, after = [], []
    for _ in range(args.runs):
        before.append(timed(py + ARGS + ["--no-compile-cache"], env))
        after.append(timed(py + ARGS, env))
        load.append(os.getloadavg()[0])
    assert all(r["stdout"] == warm["stdout"] for r in before + after), "the answers differ"
    result = {
        "what": "deepseek-vl-jax generate on models/deepseek-vl-tiny (1.6M parameters), one image, "
                "--max-new-tokens 16, a fresh process per run",
        "answer": warm["stdout"],
        "before_no_cache": summary(before),
        "after_warm_cache": summary(after),
        "first_run_filling_the_cache": warm,
        "import_cli_s_median": round(statistics.median(r["wall_s"] for r in imports), 3),
        "load_average_1min": load,
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "cli.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("before_no_cache", "after_warm_cache")}))
    print("before", {k: v for k, v in result["before_no_cache"].items() if k != "runs"})
    print("after ", {k: v for k, v in result["after_warm_cache"].items() if k != "runs"})


if __name__ == "__main__":
    main()

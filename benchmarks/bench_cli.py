"""Wall and CPU time of a repeat `deepseek-vl-jax generate` on the shipped model, each run a fresh process.

    flock /work/wt/bench.lock python benchmarks/bench_cli.py [--runs 3] [--before REF] [--no-cold]

Three ways, side by side, runs alternating so that all see the same machine load:
- "after": this code with its caches warm (JAX's persistent compilation cache + `program_cache`: the parameter
  shapes and the compiled prefill/step programs), as every repeat run of the CLI is;
- "before": the code of git REF (default: the merge-base with main), its compilation cache warm: what a repeat
  run cost until now (the package extracted with `git archive`, run from a temporary directory);
- "cold": this code with `--no-compile-cache` (everything traced and compiled again).
One untimed run fills each cache first. Kept per run: wall and CPU (user + sys) seconds of the child, the
answer, JAX's cache hits / misses, the program cache's counters and the generation traces. With the load average
before and after (this 2-core machine is shared) and the bare import time of the CLI. Writes
benchmarks/results/cli.json; the "after" figures it replaces are kept under "replaced".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "cli.json")
MODEL = os.path.join(ROOT, "models", "deepseek-vl-tiny")
ARGS = ["generate", "--model", MODEL, "--image", os.path.join(ROOT, "examples", "shapes.png"), "--prompt",
        "What color is the circle?", "--max-new-tokens", "16"]
CODE = """
import json, sys
from deepseek_vl_jax.cli_runtime import CacheCounter
counter = CacheCounter().register()
from deepseek_vl_jax import cli
rc = cli.main(sys.argv[1:])
stats = {"rc": rc, "hits": counter.hits, "misses": counter.misses}
try:
    from deepseek_vl_jax import program_cache
    from deepseek_vl_jax.generation import loop
    stats.update(program_cache.counts(), traces=loop.compile_count())
except ImportError:  # the code before program_cache
    pass
print(json.dumps(stats), file=sys.stderr)
"""


def timed(argv: list[str], env: dict, cwd: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
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
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 3),
            "cpu_s_min": round(min(r["cpu_s"] for r in runs), 3), "runs": runs}


def extract(ref: str, into: str) -> str:
    """The package of git `ref`, extracted into `into` (returns its commit)."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "deepseek_vl_jax"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return commit


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--before", default=None, help="git ref of the 'before' code (default: merge-base with main)")
    ap.add_argument("--no-cold", action="store_true", help="skip the runs without any cache")
    args = ap.parse_args()
    ref = args.before or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="bench_cli_")
    old_code = os.path.join(work, "before")
    os.makedirs(old_code)
    commit = extract(ref, old_code)
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env_new = {**base, "DEEPSEEK_VL_JAX_CACHE_DIR": os.path.join(work, "cache_after"), "PYTHONPATH": ROOT}
    env_old = {**base, "DEEPSEEK_VL_JAX_CACHE_DIR": os.path.join(work, "cache_before"), "PYTHONPATH": old_code}
    py = [sys.executable, "-c", CODE]
    started = uptime()
    load = [os.getloadavg()[0]]
    imports = [timed([sys.executable, "-c", "import deepseek_vl_jax.cli"], env_new, ROOT) for _ in range(args.runs)]
    fill = {"after": timed(py + ARGS, env_new, ROOT), "before": timed(py + ARGS, env_old, work)}
    runs: dict[str, list] = {"after": [], "before": [], "cold": []}
    for _ in range(args.runs):
        runs["after"].append(timed(py + ARGS, env_new, ROOT))
        runs["before"].append(timed(py + ARGS, env_old, work))
        if not args.no_cold:
            runs["cold"].append(timed(py + ARGS + ["--no-compile-cache"], env_new, ROOT))
        load.append(os.getloadavg()[0])
    answers = {r["stdout"] for rs in runs.values() for r in rs} | {r["stdout"] for r in fill.values()}
    assert len(answers) == 1, f"the answers differ: {answers}"
    previous = {}
    if os.path.exists(RESULT):
        with open(RESULT) as f:
            previous = json.load(f)
    replaced = previous.get("replaced") or {
        k: {kk: vv for kk, vv in v.items() if kk != "runs"} if isinstance(v, dict) else v
        for k, v in previous.items() if k in ("after_warm_cache", "before_no_cache", "load_average_1min")}
    result = {
        "what": "deepseek-vl-jax generate on models/deepseek-vl-tiny (1.6M parameters), one image, "
                "--max-new-tokens 16, a fresh process per run",
        "answer": answers.pop(),
        "after_warm_caches": summary(runs["after"]),
        "before_warm_compile_cache": {"code": commit, **summary(runs["before"])},
        **({"cold_no_cache": summary(runs["cold"])} if runs["cold"] else {}),
        "first_runs_filling_the_caches": fill,
        "import_cli_s_median": round(statistics.median(r["wall_s"] for r in imports), 3),
        "load_average_1min": load, "uptime_start": started, "uptime_end": uptime(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "replaced": replaced,
    }
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for name in ("after_warm_caches", "before_warm_compile_cache", "cold_no_cache"):
        if name in result:
            print(f"{name:28s}", {k: v for k, v in result[name].items() if k != "runs"})
    print("load", load, "|", started)


if __name__ == "__main__":
    main()

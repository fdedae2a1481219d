"""The serving decode step vs offline generate's, side by side in one process, on bench_serve's 117M shape: the
engine's `decode` program over 16 active slots (N = 1 step a call) with its cache of S slots per row, for the S that
bench_serve's 64- and 256-token runs use and for the S of offline `generate` (prompt bucket + answer buffer); and
offline `generate`'s own per-step cost at batch 16, (time of 128 new tokens - time of 64) / 64 on the same 16 chats
(its prefill cancels out).

    flock /work/wt/bench.lock python benchmarks/serve_decode_step.py   # -> benchmarks/results/serve_decode_step.json
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torchvision_ops  # noqa: E402

torchvision_ops.ensure_importable()

import numpy as np  # noqa: E402

CALLS = 12


def engine_step_s(model, proc, max_seq_len: int, position: int) -> tuple[int, float]:
    """(S, median seconds of one decode call, 16 slots active at `position`)."""
    import jax

    from deepseek_vl_jax.serving import Engine, EngineConfig, programs

    engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=64, max_seq_len=max_seq_len))
    b = engine.shapes.slots
    full = lambda v: np.full(b, v, np.int32)
    state = programs.DecodeState(token=full(5), position=full(position), counter=full(1), remaining=full(10 ** 6),
                                 active=np.ones(b, bool))
    params, eos = engine._slot_params([None] * b), np.array([-1], np.int32)
    cache, times = engine.cache, []
    for i in range(CALLS + 2):
        t0 = time.perf_counter()
        cache, state, picked, _ = engine.programs.decode(engine.params, cache, state, np.zeros(b, bool), state,
                                                         params, eos)
        jax.block_until_ready(picked)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return engine.shapes.seq_len, float(np.median(times))


def offline_step_s(model, proc, chats) -> dict:
    from deepseek_vl_jax.generation import generate
    from deepseek_vl_jax.generation.kv_cache import bucket_length, gen_buffer_length

    batch = proc(chats, add_generation_prompt=True, padding_side="left")
    out = {}
    for n in (64, 128):
        generate(model, batch, max_new_tokens=n, eos_token_id=-1)  # compile
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            generate(model, batch, max_new_tokens=n, eos_token_id=-1)
            runs.append(time.perf_counter() - t0)
        out[n] = min(runs)
    t = bucket_length(batch["input_ids"].shape[1])
    return {"generate_64_s": out[64], "generate_128_s": out[128], "step_s": (out[128] - out[64]) / 64,
            "cache_slots_64": t + gen_buffer_length(64), "cache_slots_128": t + gen_buffer_length(128)}


def main() -> None:
    import bench_serve

    import deepseek_vl_jax as D
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving.media import MediaLimits, load_image

    path = bench_serve.build_checkpoint("/tmp/dsvl_bench_serve", 8, 1024, 16, 2816)
    model, proc = D.load_pretrained(path, progress=False), load_processor(path)
    chats = [[{"role": "user", "content": [{"type": "image", "image": load_image(bench_serve.image_url(16000 + i),
                                                                                MediaLimits(), "x")},
                                           {"type": "text", "text": bench_serve.QUESTION}]}] for i in range(16)]
    result = {"shape": "bench_serve's 117M (LLaMA 8x1024, SigLIP 6x384), float32, 16 rows",
              "uptime_start": bench_serve.uptime(), "engine_decode_call_s": {}}
    offline = offline_step_s(model, proc, chats)
    result["offline_generate"] = offline
    print(json.dumps(offline), flush=True)
    # bench_serve's engines: max_seq_len 384 (64-token answers) and 576 (256) -> S = 448 and 640; offline's S
    for label, max_seq in (("bench_serve 64-token engine", 384), ("bench_serve 256-token engine", 576),
                           ("offline's 64-token S", offline["cache_slots_64"] - 64),
                           ("offline's 128-token S", offline["cache_slots_128"] - 64)):
        s, t = engine_step_s(model, proc, max_seq, position=min(300, max_seq - 1))
        result["engine_decode_call_s"][label] = {"cache_slots_S": s, "median_s": t,
                                                 "vs_offline_step": t / offline["step_s"]}
        print(label, s, t, flush=True)
    result["uptime_end"] = bench_serve.uptime()
    out = os.path.join(ROOT, "benchmarks", "results", "serve_decode_step.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Where a train step's time goes: one compiled step (full fine-tune, LoRA or QLoRA on bench_train.py's shape and
batch) run under jax's profiler, each executed op's time summed by phase (forward / backward / optimizer) and by
what it belongs to (op_name metadata of the optimized HLO), beside the compiled program's cost analysis and memory.

    python benchmarks/train_profile.py --mode lora [--shape small] [--runs 1] [--remat none] [--top 25]
    python benchmarks/train_profile.py --mode peft      # transformers + peft LoRA + torch AdamW under torch.profiler

Reads the HF checkpoint bench_train.py writes (`/tmp/deepseek-vl-jax-bench-train-<shape>`, made if missing).
Prints JSON: wall time per step, op time by category (ms summed over the threads that ran ops, so the total exceeds
the wall time on 2 cores), the `top` instructions by time with their shapes, and `cost_analysis` FLOPs / bytes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (the shape, batch and weights)

INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\(")


def _instructions(hlo_text: str, rank: int) -> dict:
    """instruction name -> (category, phase, shape, opcode) from the optimized HLO's op_name metadata."""
    out = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        op = meta.group(1) if meta else ""
        phase = "backward" if "transpose(" in op else "optimizer" if not op or "jvp(" not in op and (
            "adam" in op or "clip" in op or "optax" in op or "update" in op) else "forward"
        dims = set(int(d) for d in re.findall(r"[\[,](\d+)(?=[,\]])", line.split("metadata=")[0]))
        if "vision_model" in op or "encode_images" in op or "aligner" in op:
            what = "image encoder + aligner"
        elif "head_loss" in op or "_chunk" in op or "lm_head" in op or "logits" in op:
            what = "LM head + loss"
        elif re.search(r"_proj", op) and opcode in ("dot", "fusion", "custom-call") and " dot(" in line or (
                re.search(r"_proj", op) and "dot_general" in op):
            what = "decoder dense: adapter (rank dims)" if rank in dims else "decoder dense"
        elif "self_attn" in op:
            what = "attention (einsums, softmax, rope)"
        elif "layers" in op or "LlamaBlock" in op:
            what = "decoder other (norms, residuals, MLP act)"
        elif phase == "optimizer":
            what = "optimizer"
        else:
            what = "other"
        if opcode in ("copy", "transpose") or opcode == "fusion" and "copy" in name:
            what += " [copy/transpose]"
        if opcode in ("dynamic-slice", "dynamic-update-slice") or "dynamic-slice" in name or "dynamic-update" in name:
            what += " [scan slicing]"
        out[name] = (what, phase, shape, opcode)
    return out


def dot_flops_by_part(hlo_text: str, rank: int) -> dict:
    """GFLOP of the optimized HLO's dots by part of the step, counted statically: a while loop's body (a scanned
    tower) once, and every loss chunk, run or skipped."""
    dims = {m.group(1): [int(d) for d in m.group(2).split(",") if d]
            for m in re.finditer(r"%([\w.\-]+) = \w+\[([0-9,]*)\]", hlo_text)}
    dot = re.compile(r"%[\w.\-]+ = \w+\[([0-9,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\)"
                     r".*lhs_contracting_dims=\{([0-9,]*)\}")
    out = collections.Counter()
    for line in hlo_text.splitlines():
        m = dot.search(line)
        if not m:
            continue
        shape = [int(d) for d in m.group(1).split(",") if d]
        k = 1
        for d in m.group(3).split(","):
            k *= dims[m.group(2)][int(d)]
        flops = 2 * k
        for d in shape:
            flops *= d
        meta = re.search(r'op_name="([^"]*)"', line)
        op = meta.group(1) if meta else ""
        bwd = "transpose(" in op
        if "vision_model" in op or "aligner" in op:
            part = "image encoder + aligner (one scanned layer)"
        elif "head_loss" in op or "lm_head" in op or "_chunk" in op:
            part = "LM head + loss (all chunks)"
        elif re.search(r"(q|k|v|o|gate|up|down)_proj", op):
            part = (f"LoRA rank-{rank} dots" if rank in shape or k == rank else
                    "frozen base input gradient dy W^T" if bwd else "decoder dense forward")
        elif "bkgt" in op or "self_attn" in op:
            part = "attention backward" if bwd or "_bwd" in op else "attention forward"
        else:
            part = "other"
        out[part] += flops
    return {k: round(v / 1e9, 1) for k, v in out.most_common()}


def profile(compiled, args, names: dict, runs: int, top: int) -> dict:
    import jax
    from jax.profiler import ProfileData

    per, phases, inst = collections.Counter(), collections.Counter(), collections.Counter()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(runs):
                out = compiled(*args)
                jax.block_until_ready(out)
                args = (out[0],) + tuple(args[1:])
        wall = (time.perf_counter() - t0) / runs
        data = ProfileData.from_file(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in names:
                        what, phase, _, _ = names[ev.name]
                        per[what] += ev.duration_ns
                        phases[phase] += ev.duration_ns
                        inst[ev.name] += ev.duration_ns
    total = sum(per.values())
    ms = lambda v: round(v / runs / 1e6, 1)
    return {"wall_s_under_profiler": round(wall, 2), "op_ms_total": ms(total),
            "by_phase": {k: ms(v) for k, v in phases.most_common()},
            "by_category": {k: {"ms": ms(v), "share": round(v / total, 3)} for k, v in per.most_common()},
            "top_instructions": [{"name": n, "ms": ms(v), "what": names[n][0], "phase": names[n][1],
                                  "shape": names[n][2], "opcode": names[n][3]} for n, v in inst.most_common(top)],
            }, args[0]


def profile_torch(runs: int, top: int) -> dict:
    """bench_train's peft LoRA step under torch.profiler: self CPU time by aten op (mm / addmm / bmm / SDPA ...)."""
    transformers = bench_train.import_transformers()
    import peft
    import torch

    torch.manual_seed(0)
    model = transformers.DeepseekVLForConditionalGeneration.from_pretrained(bench_train.WEIGHTS,
                                                                            dtype=torch.float32).train()
    model = peft.get_peft_model(model, peft.LoraConfig(r=bench_train.LORA_RANK, lora_alpha=bench_train.LORA_ALPHA,
                                                       target_modules=bench_train.PEFT_TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95))
    batch = {k: torch.from_numpy(v) for k, v in bench_train.make_batch().items()}

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(2):
        t = time.perf_counter()
        step()
        times.append(round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            step()
    wall = (time.perf_counter() - t) / runs
    ops = [e for e in prof.key_averages(group_by_input_shape=True)]
    by_op = collections.Counter()
    for e in prof.key_averages():
        by_op[e.key] += e.self_cpu_time_total
    total = sum(by_op.values())
    ms = lambda us: round(us / runs / 1e3, 1)
    return {"step_times_s": times, "threads": torch.get_num_threads(), "wall_s_under_profiler": round(wall, 2),
            "op_ms_total": ms(total),
            "by_op": {k: {"ms": ms(v), "share": round(v / total, 3)} for k, v in by_op.most_common(top)},
            "top_by_shape": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "ms": ms(e.self_cpu_time_total),
                              "calls": e.count // runs}
                             for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("full", "lora", "qlora", "peft"), default="lora")
    p.add_argument("--shape", choices=("0.45b", "small"), default="0.45b")
    p.add_argument("--remat", default="none")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--timed", type=int, default=1, help="timed steps before profiling")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    p.add_argument("--hlo", default=None, help="also write the optimized HLO text here")
    args = p.parse_args()
    bench_train.use_shape(args.shape)
    bench_train.SHAPE = args.shape
    bench_train.WEIGHTS = os.path.join("/tmp", f"deepseek-vl-jax-bench-train-{args.shape}")
    if not os.path.isdir(bench_train.WEIGHTS):
        subprocess.run([sys.executable, bench_train.__file__, "--write-weights", "--shape", args.shape,
                        "--weights", bench_train.WEIGHTS], check=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if args.mode == "peft":
        result = {"mode": args.mode, "shape": args.shape, "uptime_at_start": uptime,
                  **profile_torch(args.runs, args.top),
                  "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    import jax

    step, state, batch = bench_train.build_jax_step(args.remat, "none" if args.mode == "full" else args.mode)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    names = _instructions(compiled.as_text(), bench_train.LORA_RANK)
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    times = []
    for _ in range(args.timed):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(round(time.perf_counter() - t, 2))
    prof, state = profile(compiled, (state, batch), names, args.runs, args.top)
    result = {"mode": args.mode, "shape": args.shape, "remat": args.remat, "uptime_at_start": uptime,
              "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "compile_s": round(compile_s, 1), "step_times_s": times,
              "cost_analysis": {"gflops": round(cost.get("flops", 0) / 1e9, 1),
                                "gbytes_accessed": round(cost.get("bytes accessed", 0) / 1e9, 1)},
              "temp_gb": round(mem.temp_size_in_bytes / 1e9, 2),
              "dot_gflops_by_part": dot_flops_by_part(compiled.as_text(), bench_train.LORA_RANK), **prof}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

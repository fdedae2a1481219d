"""Serving speed: the OpenAI-compatible server on 127.0.0.1 under 1, 4 and 16 concurrent streaming clients, each
sending chats with one image; side by side in the same run, this project's offline `generate` on the same requests
batched, and transformers' `generate` one request at a time (what its `pipeline` does).

    flock /work/wt/bench.lock python benchmarks/bench_serve.py [--checkpoint DIR] [--max-tokens 64,256]

Model (default): LLaMA 8 layers, hidden 1024, 16 heads, intermediate 2816 (~104M parameters), SigLIP 6 layers,
hidden 384, 224 px, patch 16 -> 196 image tokens; the tiny byte-level BPE tokenizer of tests/processing_fixtures
(vocabulary ~600). Random weights, float32. Smaller than bench_generate's 0.45B so that a run takes a few minutes on
this 2-core machine, but large enough that a decode step is dominated by reading the weights, as it is for the real
models (`--layers 6 --hidden 512 --heads 8 --ffn 1408 --max-tokens 32` is the ~20M shape of the first runs, where
per-step overhead dominates). The engine's --max-seq-len is what the workload needs (prompt + max tokens).

Two answer lengths, each with its own engine (--max-seq-len sized to it): 64 tokens, where prefill is most of the
work (a prompt is ~250 tokens), and 256, nearer real chat answers, where decoding is. The 1- and 4-client runs and the
second turn use the first length; 16 clients, offline batched and transformers run at every length, one after the
other, so each ratio compares runs minutes apart under the same load.

Measures per concurrency: output tokens/s, requests/s, time to first token p50/p99, inter-token latency p50/p99
(from the SSE stream on the client side, one chunk per token as log-probabilities are asked for); and a two-turn
chat's second-turn time to first token with the prefix and image caches warm vs emptied. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from generate_profile import cpu_flags  # noqa: E402  the CPU model and its ISA extensions: results differ by host
import torchvision_ops  # noqa: E402  transformers imports torchvision: see tests/torchvision_ops.py

torchvision_ops.ensure_importable()

import numpy as np  # noqa: E402

IMAGE_SIZE, PATCH = 224, 16
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
QUESTION = "Describe the picture in detail."
THINK_S = 1.0  # between a first turn's answer and the second turn
SECOND_TURN_TOKENS = 4  # the second turn measures only its time to first token


def build_checkpoint(path: str, layers: int, hidden: int, heads: int, ffn: int) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            t = json.load(f)["text_config"]
        if (t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"], t["intermediate_size"]) == (
                layers, hidden, heads, ffn):
            return path
        import shutil
        shutil.rmtree(path)
    import processing_fixtures as PF
    import torch
    import transformers

    from deepseek_vl_jax.processing import load_processor

    PF.make_processor_dir(path, num_image_tokens=NUM_IMAGE_TOKENS, image_size=IMAGE_SIZE)
    proc = load_processor(path)
    vocab = -(-proc.tokenizer.get_vocab_size() // 64) * 64
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=proc.bos_token_id,
                eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id)
    vision = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                  image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    torch.manual_seed(0)
    config = transformers.DeepseekVLConfig(text_config=text, vision_config=vision, image_token_id=proc.image_token_id,
                                           tie_word_embeddings=False)
    transformers.DeepseekVLForConditionalGeneration(config).eval().save_pretrained(path)
    return path


def image_url(seed: int) -> str:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(seed: int, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed)}},
                                        {"type": "text", "text": text}]}


async def one_request(client, messages, max_tokens):
    """Stream one chat; returns (time to first token, inter-token gaps, completion tokens, text)."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True}  # logprobs: one chunk per token
    t0 = time.perf_counter()
    ttft, last, gaps, tokens, text = None, None, [], 0, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk["choices"]:
                if not ch.get("logprobs"):  # the role chunk, or a bare finish
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
                text += ch["delta"].get("content") or ""
    return ttft, gaps, tokens, text


async def load_test(url, clients, per_client, max_tokens, seed0):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(c):
            out = []
            for k in range(per_client):
                out.append(await one_request(client, [user(seed0 + c * per_client + k)], max_tokens))
            return out
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall,
            "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "itl_p50_s": pct(gaps, 50),
            "itl_p99_s": pct(gaps, 99)}


async def second_turn(url, engine, max_tokens, seed):
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        first = [user(seed)]
        _, _, _, answer = await one_request(client, first, min(max_tokens, 64))  # the turn fits any --max-seq-len
        turn2 = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
        await asyncio.sleep(THINK_S)  # the user reads the answer; meanwhile the engine caches its KV
        warm = (await one_request(client, turn2, SECOND_TURN_TOKENS))[0]
        for cache in (engine.prefix_cache, engine.image_cache):
            cache.entries.clear()
            cache.bytes = 0
        cold = (await one_request(client, turn2, SECOND_TURN_TOKENS))[0]
    return {"second_turn_ttft_with_cache_s": warm, "second_turn_ttft_without_cache_s": cold, "ratio": warm / cold}


def offline_generate(model, proc, n, max_tokens, seed0):
    """The same work as the server's: decode the requests' PNG data URLs, run the processor on the 16 chats (one
    batch), then `generate` them batched. Timed with and without the image/processor part."""
    from deepseek_vl_jax.generation import generate
    from deepseek_vl_jax.serving.media import MediaLimits, load_image

    urls = [image_url(seed0 + i) for i in range(n)]

    def prepare():
        chats = [[{"role": "user", "content": [{"type": "image", "image": load_image(u, MediaLimits(), "x")},
                                               {"type": "text", "text": QUESTION}]}] for u in urls]
        return chats, proc(chats, add_generation_prompt=True, padding_side="left")

    chats, batch = prepare()
    generate(model, batch, max_new_tokens=max_tokens, eos_token_id=-1)  # compile
    t0 = time.perf_counter()
    chats, batch = prepare()
    t1 = time.perf_counter()
    generate(model, batch, max_new_tokens=max_tokens, eos_token_id=-1)
    wall = time.perf_counter() - t0
    rate = n * max_tokens / wall
    return {"requests": n, "output_tokens": n * max_tokens, "wall_s": wall, "output_tokens_per_s": rate,
            "includes": "PNG decode + processor + generate", "preprocess_s": t1 - t0,
            "generate_only_tokens_per_s": n * max_tokens / (wall - (t1 - t0))}, chats


def transformers_one_at_a_time(path, chats, max_tokens):
    import processing_fixtures as PF
    import torch
    import transformers

    hf = transformers.DeepseekVLForConditionalGeneration.from_pretrained(path).eval()
    hp = PF.load_hf_processor(path)
    times, tokens = [], 0
    for chat in chats:
        inputs = PF.reference_inputs(hp, [chat])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=max_tokens,
                              do_sample=False, min_new_tokens=max_tokens)
        times.append(time.perf_counter() - t0)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    return {"requests": len(chats), "output_tokens": tokens, "wall_s": sum(times),
            "output_tokens_per_s": tokens / sum(times), "torch_threads": torch.get_num_threads()}


def load_test_in_process(url, clients, per_client, max_tokens, seed0):
    """The clients in a separate Python process (as real clients are), so they do not hold this process's GIL."""
    import subprocess

    spec = json.dumps([url, clients, per_client, max_tokens, seed0])
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-test", spec], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native thread id (/proc/self/task)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_by_thread(before: dict[int, float], after: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """CPU seconds between two `thread_cpu` snapshots, grouped: the engine loop, the HTTP server (uvicorn's event
    loop), the clients (this process's main thread, if they run here), the processor's worker threads, and the
    native threads (XLA's and torch's compute pools)."""
    import re

    groups: dict[str, float] = {}
    for tid, t in after.items():
        name = names.get(tid, "native (XLA / Eigen compute threads)")
        name = {"MainThread": "main (benchmark clients when in-process)"}.get(name, name)
        name = re.sub(r"Thread-\d+", "Thread", name)
        name = re.sub(r"_\d+$", "_N (asyncio.to_thread: image decode + processor)", name)
        groups[name] = groups.get(name, 0.0) + t - before.get(tid, 0.0)
    return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def uptime() -> str:
    import subprocess
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/tmp/dsvl_bench_serve")
    parser.add_argument("--max-tokens", default="64,256", help="answer lengths, comma-separated")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--chunk", type=int, default=64, help="the engine's prefill chunk (prefix-cache block)")
    parser.add_argument("--hf-requests", type=int, default=4, help="transformers requests (one at a time)")
    parser.add_argument("--prefill-budget", type=int,
                        help="the engine's prompt tokens between two decode steps (default: EngineConfig's)")
    parser.add_argument("--clients", default="1,4,16",
                        help="concurrencies at the first answer length (later lengths run only the last)")
    parser.add_argument("--decode-steps", type=int, help="the engine's decode steps per call (default: EngineConfig's)")
    parser.add_argument("--clients-in-process", action="store_true",
                        help="run the clients in this process (competing for its GIL) instead of a separate one")
    parser.add_argument("--timeline", action="store_true",
                        help="time every engine program call and host span (waits for each result: measuring only)")
    parser.add_argument("--no-second-turn", action="store_true", help="skip the prefix-cache second-turn run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serve.json"))
    parser.add_argument("--load-test", help=argparse.SUPPRESS)  # the client process: [url, clients, per, tokens, seed]
    args = parser.parse_args()
    if args.load_test:
        print(json.dumps(asyncio.run(load_test(*json.loads(args.load_test)))))
        return

    import jax

    import deepseek_vl_jax as D
    from deepseek_vl_jax.processing import load_processor
    from deepseek_vl_jax.serving import Engine, EngineConfig, ServerConfig, create_app
    from deepseek_vl_jax.serving.server import BackgroundServer
    from deepseek_vl_jax.serving.timeline import Timeline

    budget = args.prefill_budget or EngineConfig.prefill_budget
    steps = args.decode_steps or EngineConfig.decode_steps
    path = build_checkpoint(args.checkpoint, args.layers, args.hidden, args.heads, args.ffn)
    model, proc = D.load_pretrained(path, progress=False), load_processor(path)
    params = sum(x.size for x in jax.tree.leaves(model.params))
    lengths = [int(x) for x in args.max_tokens.split(",")]
    concurrencies = [int(x) for x in args.clients.split(",")]
    result = {"shape": f"LLaMA {args.layers}x{args.hidden} ({args.heads} heads, ffn {args.ffn}), SigLIP 6x384 "
                       f"224px/16 -> 196 image tokens, vocab {model.config.text.vocab_size}, {params / 1e6:.0f}M "
                       "parameters, float32", "second_turn_think_s": THINK_S,
              "platform": platform.platform(), "devices": str(jax.devices()[0]), "cpus": os.cpu_count(),
              **cpu_flags(),
              "uptime_start": uptime(), "load_average_1_5_15": {"start": os.getloadavg()},
              "clients": "this process" if args.clients_in_process else "a separate process", "runs": {}}
    for n, max_tokens in enumerate(lengths):
        run = result["runs"][str(max_tokens)] = {"max_tokens": max_tokens}
        # the positions the workload needs: a one-image prompt (~250 tokens) + max tokens + a short second turn
        seq = -(-(256 + max_tokens + 32 + SECOND_TURN_TOKENS) // args.chunk) * args.chunk
        engine = Engine(model, proc, EngineConfig(max_batch=16, prefill_chunk=args.chunk, max_seq_len=seq,
                                                  max_queue=256, prefill_budget=budget, decode_steps=steps))
        t0 = time.perf_counter()
        programs = engine.warmup()
        run["engine"] = {"slots": 16, "prefill_chunk": args.chunk, "max_seq_len": seq,
                         "prefill_budget": budget, "decode_steps": steps, "programs": programs,
                         "warmup_s": time.perf_counter() - t0}
        app = create_app(engine, ServerConfig(model_names=("bench",)))
        with BackgroundServer(app) as srv:
            run["server"] = []
            for clients in concurrencies if n == 0 else concurrencies[-1:]:
                per = 2 if clients == 1 else 1
                names = {t.native_id: t.name for t in threading.enumerate()}
                if args.timeline and clients == concurrencies[-1]:
                    engine.timeline = Timeline()
                cpu0, t0 = thread_cpu(), time.perf_counter()
                if args.clients_in_process:
                    r = asyncio.run(load_test(srv.url, clients, per, max_tokens, seed0=1000 * clients))
                else:
                    r = load_test_in_process(srv.url, clients, per, max_tokens, 1000 * clients)
                names.update({t.native_id: t.name for t in threading.enumerate()})
                r["cpu_s_by_thread"] = cpu_by_thread(cpu0, thread_cpu(), names)
                if engine.timeline is not None:
                    r["timeline"] = engine.timeline.summary(t0, time.perf_counter())
                    engine.timeline = None
                print(json.dumps(r), flush=True)
                run["server"].append(r)
            if n == 0 and not args.no_second_turn:
                result["prefix_cache"] = asyncio.run(second_turn(srv.url, engine, max_tokens, seed=7))
                print(json.dumps(result["prefix_cache"]), flush=True)
        engine.stop()
        del engine
        run["offline_generate_batched"], chats = offline_generate(model, proc, 16, max_tokens, seed0=16000)
        print(json.dumps(run["offline_generate_batched"]), flush=True)
        run["transformers_one_at_a_time"] = transformers_one_at_a_time(path, chats[:args.hf_requests], max_tokens)
        print(json.dumps(run["transformers_one_at_a_time"]), flush=True)
        at16 = run["server"][-1]["output_tokens_per_s"]  # the largest concurrency (16 by default)
        run["ratios"] = {
            "server16_vs_offline_batched": at16 / run["offline_generate_batched"]["output_tokens_per_s"],
            "server16_vs_transformers": at16 / run["transformers_one_at_a_time"]["output_tokens_per_s"]}
        run["uptime_end"] = uptime()
        print(json.dumps(run["ratios"]), flush=True)
    if "prefix_cache" in result:
        result["second_turn_ttft_cache_vs_none"] = result["prefix_cache"]["ratio"]
    result["load_average_1_5_15"]["end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

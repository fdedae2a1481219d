"""Training throughput and CPU MFU: this package's train step vs transformers + torch AdamW, same model shape and
batch, side by side in one run (each measurement in its own subprocess, so peak memory is per framework).

Shape (~0.45B): LLaMA 12 layers, hidden 1024, 16 heads, MLP 2816, vocab 102400 (untied head); SigLIP 12 layers,
hidden 768 at 384 px / 16 (576 image tokens); MLP aligner. Batch: 2 rows x 630 tokens (one image + 54 text tokens),
labels on the text after the image. float32 everywhere.

    python benchmarks/bench_train.py [--steps 3] [--with-torch-frozen] [--lora | --lora-only]
                                     [--out benchmarks/results/train.json]

--lora adds, in the same run: LoRA rank 16 (alpha 32) on the language model's q/k/v/o/gate/up/down with every
tower frozen, QLoRA (the same with an int4 base, group 128), and transformers + peft with the same LoRA + torch
AdamW; each with its trainable parameters and optimizer-state bytes. --lora-only runs the full fine-tune, LoRA,
QLoRA and peft (not torch's full fine-tune nor the frozen-vision step).

Every run starts from the same random weights, written once as an HF checkpoint (`--weights`, default under
/tmp): torch loads it with `from_pretrained`, this package with `load_pretrained` (QLoRA: `quantize=`, the base
quantized tensor by tensor as it loads), as training does. The JAX children import neither torch nor
transformers, so their peak RSS is this package's own.

Reports tokens/s, step time, model FLOP/s (formula of `deepseek_vl_jax.training.flops`, the same count for both
frameworks), MFU against the float32 matmul peak measured in the same run (both torch's and XLA's), peak RSS, and
the step time with the vision tower frozen (stage 2: language model + aligner train).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from generate_profile import cpu_flags  # noqa: E402  the CPU model and its ISA extensions: results differ by host


def import_transformers():
    """transformers (and torch), imported beside torchvision (see tests/torchvision_ops.py); torch runs only."""
    import torchvision_ops

    torchvision_ops.ensure_importable()
    import transformers

    return transformers

TEXT = dict(vocab_size=102400, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6)
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384,
              patch_size=16, vision_use_head=False)
IMAGE_TOKEN = 100015
ROWS, TEXT_TOKENS = 2, 54
# --shape small (~0.07B: when the machine has no ~15 GB to spare for the 0.45B shape): same batch layout
SMALL = (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8), dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                           num_attention_heads=6, image_size=224), 31990)


def use_shape(shape: str) -> None:
    global IMAGE_TOKEN
    if shape == "small":
        TEXT.update(SMALL[0])
        VISION.update(SMALL[1])
        IMAGE_TOKEN = SMALL[2]


def hf_config():
    transformers = import_transformers()
    return transformers.DeepseekVLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE_TOKEN,
                                         tie_word_embeddings=False)


def make_batch():
    import numpy as np

    rng = np.random.default_rng(0)
    p = (VISION["image_size"] // VISION["patch_size"]) ** 2
    t = 2 + p + TEXT_TOKENS
    ids = rng.integers(3, min(100000, IMAGE_TOKEN - 1), (ROWS, t)).astype(np.int64)
    ids[:, 2:2 + p] = IMAGE_TOKEN
    labels = ids.copy()
    labels[:, :2 + p] = -100
    pixels = rng.standard_normal((ROWS, 3, VISION["image_size"], VISION["image_size"])).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "pixel_values": pixels}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_torch(n=2048, repeats=5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def write_weights(path: str) -> None:
    """The shared random weights (seed 0), as an HF checkpoint directory (once per shape)."""
    import torch

    torch.manual_seed(0)
    model = import_transformers().DeepseekVLForConditionalGeneration(hf_config())
    model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)


def model_flops(frozen_vision: bool, lora: bool = False) -> float:
    """Model FLOPs of a step (`training.flops`); LoRA: every tower frozen, the language model back-propagated
    (4W per token) plus the adapters' own 6 r (I + O) per token."""
    from deepseek_vl_jax.config import ModelConfig
    from deepseek_vl_jax.lora import LoraConfig
    from deepseek_vl_jax.training import flops
    from deepseek_vl_jax.training.config import TrainableConfig

    config = ModelConfig.from_pretrained(WEIGHTS)
    t = 2 + config.num_image_tokens + TEXT_TOKENS
    if lora:
        frozen = TrainableConfig(vision=False, aligner=False, language=False)
        return flops.step_flops(config, frozen, [t] * ROWS, ROWS, LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA))
    return flops.step_flops(config, TrainableConfig(vision=not frozen_vision), [t] * ROWS, ROWS)


LORA_RANK, LORA_ALPHA = 16, 32.0
PEFT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def run_torch(steps: int, frozen_vision: bool, lora: str = "none") -> dict:
    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    model = transformers.DeepseekVLForConditionalGeneration.from_pretrained(WEIGHTS, dtype=torch.float32).train()
    if frozen_vision:
        model.model.vision_model.requires_grad_(False)
    if lora != "none":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                           target_modules=PEFT_TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    batch = {k: torch.from_numpy(v) for k, v in make_batch().items()}
    times, losses = [], []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t)
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return {"step_times_s": times[1:], "first_step_s": times[0], "losses": losses, "peak_rss_gb": peak_rss_gb(),
            "matmul_peak_flops": matmul_peak_torch(), "threads": torch.get_num_threads(),
            "trainable_params": sum(p.numel() for p in trainable), "optimizer_state_bytes": opt_bytes}


def build_jax_step(remat: str, lora: str = "none", frozen_vision: bool = False):
    """(jitted step, state, batch [1, ...]) of this package's train step on the shared weights, plus what was
    measured on the way (load time, trainable parameters, optimizer-state bytes)."""
    import jax
    import jax.numpy as jnp

    from deepseek_vl_jax import lora as lora_lib
    from deepseek_vl_jax.config import ModelConfig
    from deepseek_vl_jax.model import DeepseekVL
    from deepseek_vl_jax.pretrained import load_pretrained
    from deepseek_vl_jax.training import optimizer as opt_lib
    from deepseek_vl_jax.training import state as state_lib
    from deepseek_vl_jax.training import step as step_lib
    from deepseek_vl_jax.training.config import OptimizerConfig, TrainableConfig

    config = ModelConfig.from_pretrained(WEIGHTS, remat_policy=remat)
    trainable = TrainableConfig(vision=not frozen_vision)
    lora_config = None
    if lora != "none":  # every tower frozen, adapters on the language model (an int4 base for qlora)
        trainable = TrainableConfig(vision=False, aligner=False, language=False)
        lora_config = lora_lib.LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, group_size=128,
                                          quantize="int4" if lora == "qlora" else "none")
    opt = OptimizerConfig(learning_rate=1e-5, clip_grad_norm=1.0)
    tx, schedule = opt_lib.make_optimizer(opt, 1000), opt_lib.learning_rate_schedule(opt, 1000)
    t = time.perf_counter()
    qconfig = None if lora_config is None else lora_config.quantize_config()
    params = load_pretrained(WEIGHTS, progress=False, quantize=qconfig, remat_policy=remat).params
    info = {"load_s": time.perf_counter() - t, "peak_rss_after_load_gb": peak_rss_gb()}
    if lora_config is not None:
        params = state_lib.add_lora(params, lora_config, trainable, jax.random.key(1))
    state = state_lib.create(params, tx, trainable)
    step, _ = step_lib.compile_steps(DeepseekVL(config), tx, trainable, schedule, lora=lora_config)
    train_part, _ = opt_lib.split(state.params, trainable)
    info["trainable_params"], _ = lora_lib.count(train_part)
    _, info["optimizer_state_bytes"] = lora_lib.count(state.opt_state)
    _, info["param_bytes"] = lora_lib.count(state.params)
    batch = {k: jnp.asarray(v[None], jnp.int32 if v.dtype.kind == "i" else jnp.float32)
             for k, v in make_batch().items()}
    build_jax_step.info = info
    return step, state, batch


def run_jax(steps: int, frozen_vision: bool, remat: str, lora: str = "none") -> dict:
    from deepseek_vl_jax.training import flops

    step, state, batch = build_jax_step(remat, lora, frozen_vision)
    info = build_jax_step.info
    times, losses = [], []
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    memory = compiled.memory_analysis()
    memory = {k: getattr(memory, k + "_in_bytes") for k in ("argument_size", "output_size", "alias_size", "temp_size")}
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t)
    import jax

    return {"step_times_s": times, "compile_s": compile_s, "losses": losses, "peak_rss_gb": peak_rss_gb(),
            "matmul_peak_flops": flops.measure_matmul_peak(), "devices": len(jax.devices()),
            **info, "step_memory_analysis_bytes": memory}


def child(args) -> None:
    if args.framework == "torch":
        out = run_torch(args.steps, args.frozen_vision, args.lora_mode)
    else:
        out = run_jax(args.steps, args.frozen_vision, args.remat, args.lora_mode)
    print("RESULT " + json.dumps(out), flush=True)


SHAPE = "0.45b"
WEIGHTS = ""  # the shared HF checkpoint directory (set in main)


def spawn(framework: str, steps: int, frozen_vision: bool, remat: str = "none", lora: str = "none") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--steps", str(steps), "--remat", remat,
           "--lora-mode", lora, "--shape", SHAPE, "--weights", WEIGHTS]
    if frozen_vision:
        cmd.append("--frozen-vision")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} run failed (exit {proc.returncode}; -9: killed, e.g. out of memory):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - t
    return out


def summarize(r: dict, flops_per_step: float, tokens: int) -> dict:
    step = sorted(r["step_times_s"])[len(r["step_times_s"]) // 2]  # median
    achieved = flops_per_step / step
    return {"step_time_s": step, "tokens_per_s": tokens / step, "model_gflops_per_s": achieved / 1e9,
            "mfu_vs_own_matmul_peak": achieved / r["matmul_peak_flops"],
            "matmul_peak_gflops_per_s": r["matmul_peak_flops"] / 1e9, "peak_rss_gb": r["peak_rss_gb"],
            "losses": r["losses"], "trainable_params": r.get("trainable_params"),
            "optimizer_state_bytes": r.get("optimizer_state_bytes"), "raw": r}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/results/train.json (train_small.json)")
    p.add_argument("--shape", choices=("0.45b", "small"), default="0.45b")
    p.add_argument("--child", choices=("torch", "jax"))
    p.add_argument("--frozen-vision", action="store_true")
    p.add_argument("--remat", default="none")
    p.add_argument("--with-torch-frozen", action="store_true", help="also time torch with SigLIP frozen (+~4 min)")
    p.add_argument("--lora", action="store_true", help="also LoRA r16 / QLoRA int4 / transformers + peft LoRA")
    p.add_argument("--lora-only", action="store_true",
                   help="full fine-tune, LoRA r16, QLoRA int4 and transformers + peft LoRA only")
    p.add_argument("--weights", default=None, help="the shared random HF checkpoint (made if missing)")
    p.add_argument("--lora-mode", choices=("none", "lora", "qlora"), default="none", help=argparse.SUPPRESS)
    p.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global SHAPE, WEIGHTS
    SHAPE = args.shape
    use_shape(args.shape)
    WEIGHTS = args.weights or os.path.join("/tmp", f"deepseek-vl-jax-bench-train-{args.shape}")
    args.out = args.out or os.path.join(REPO, "benchmarks", "results",
                                        "train.json" if args.shape == "0.45b" else "train_small.json")
    if args.write_weights:
        write_weights(WEIGHTS)
        return
    if args.child:
        args.framework = args.child
        child(args)
        return
    tokens = ROWS * (2 + (VISION["image_size"] // VISION["patch_size"]) ** 2 + TEXT_TOKENS)
    t0 = time.perf_counter()
    uptime_start = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if not os.path.isdir(WEIGHTS):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-weights", "--shape", SHAPE, "--weights",
                        WEIGHTS], check=True)
    full, frozen, lora_flops = model_flops(False), model_flops(True), model_flops(True, lora=True)
    args.lora = args.lora or args.lora_only
    failed = {}
    if args.lora_only:  # the adapters first; the full fine-tune (the largest) last, and allowed to fail
        results = {"jax_lora_r16": spawn("jax", args.steps, False, lora="lora"),
                   "jax_qlora_int4_r16": spawn("jax", args.steps, False, lora="qlora"),
                   "torch_peft_lora_r16": spawn("torch", args.steps, False, lora="lora")}
        try:
            results["jax"] = spawn("jax", args.steps, False)
        except RuntimeError as e:
            failed["jax"] = str(e).splitlines()[0]
    else:
        results = {"torch": spawn("torch", args.steps, False), "jax": spawn("jax", args.steps, False),
                   "jax_frozen_vision": spawn("jax", args.steps, True)}
    if args.with_torch_frozen:
        results["torch_frozen_vision"] = spawn("torch", args.steps, True)
    if args.lora and not args.lora_only:
        results["jax_lora_r16"] = spawn("jax", args.steps, False, lora="lora")
        results["jax_qlora_int4_r16"] = spawn("jax", args.steps, False, lora="qlora")
        results["torch_peft_lora_r16"] = spawn("torch", args.steps, False, lora="lora")
    s = {k: summarize(v, lora_flops if "lora" in k else frozen if "frozen" in k else full, tokens)
         for k, v in results.items()}
    report = {
        "benchmark": f"train step, DeepSeek-VL shape {SHAPE} (LLaMA {TEXT['num_hidden_layers']}x{TEXT['hidden_size']}, "
                     f"vocab {TEXT['vocab_size']}; SigLIP {VISION['num_hidden_layers']}x{VISION['hidden_size']} @ "
                     f"{VISION['image_size']}px), batch {ROWS} x {tokens // ROWS} tokens (1 image + {TEXT_TOKENS} text each), float32, CPU",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **cpu_flags(),
                    "load_avg_at_end": os.getloadavg(),
                    "uptime_at_start": uptime_start,
                    "uptime_at_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "model_flops_per_step": {"all_trainable": full, "vision_frozen": frozen, "lora_r16": lora_flops},
        **({"speedup_tokens_per_s_vs_transformers": s["jax"]["tokens_per_s"] / s["torch"]["tokens_per_s"],
            "jax_mfu_vs_torch_matmul_peak": s["jax"]["model_gflops_per_s"] * 1e9
            / results["torch"]["matmul_peak_flops"]} if "torch" in s else {}),
        "results": s,
        **({"failed_runs": failed} if failed else {}),
        **({"lora_vs_transformers_peft": {
            "tokens_per_s_ratio": s["jax_lora_r16"]["tokens_per_s"] / s["torch_peft_lora_r16"]["tokens_per_s"],
            "peak_memory_ratio": s["jax_lora_r16"]["peak_rss_gb"] / s["torch_peft_lora_r16"]["peak_rss_gb"],
            "qlora_tokens_per_s_ratio": s["jax_qlora_int4_r16"]["tokens_per_s"]
            / s["torch_peft_lora_r16"]["tokens_per_s"],
            "qlora_peak_memory_ratio": s["jax_qlora_int4_r16"]["peak_rss_gb"] / s["torch_peft_lora_r16"]["peak_rss_gb"],
        }} if args.lora else {}),
        "runtime_s": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    brief = {k: {m: round(v[m], 3) for m in ("step_time_s", "tokens_per_s", "model_gflops_per_s",
                                              "mfu_vs_own_matmul_peak", "peak_rss_gb")} for k, v in s.items()}
    print(json.dumps({k: report.get(k) for k in ("speedup_tokens_per_s_vs_transformers", "lora_vs_transformers_peft")}
                     | brief, indent=1))


if __name__ == "__main__":
    main()

"""`deepseek-vl-jax train`: sharded, resumable fine-tuning.

    deepseek-vl-jax train --model DIR --data train.jsonl --output OUT [--config stage3_sft|FILE.json]
        [--steps N] [--batch-size B] [--learning-rate LR] [--eval-data heldout.jsonl] [--set key=value ...]

Running it again with the same OUT resumes from the latest checkpoint. Multi-host: start the same command on every
host; `jax.distributed.initialize` runs when --coordinator/--num-processes/--process-id are given, or (with
`--distributed auto`, the default) when a cluster environment is detected (Cloud TPU, SLURM, Open MPI, or
JAX_COORDINATOR_ADDRESS), and it says so in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("deepseek_vl_jax.train")

CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF or Flax checkpoint directory (with the processor files)")
    p.add_argument("--data", required=True, help="training JSONL, one {\"messages\": [...]} chat per line")
    p.add_argument("--output", required=True, help="output directory (resumed if it holds checkpoints)")
    p.add_argument("--config", help="training config: a JSON file or a stage name (stage1_aligner, "
                                    "stage2_pretrain, stage3_sft)")
    p.add_argument("--eval-data", help="held-out JSONL; its loss is logged every eval_every steps")
    p.add_argument("--steps", type=int, help="total optimizer steps (sets steps)")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step, all hosts together (sets data.batch_size)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (sets optimizer.learning_rate)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optimizer.grad_accum_steps=4 --set mesh.tensor=2")
    g = p.add_argument_group("multi-host")
    g.add_argument("--coordinator", help="coordinator address host:port (process 0's)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: initialize when flags are given or a cluster environment is detected")
    p.add_argument("--log-level", default="INFO")


def _cluster_detected() -> str | None:
    for name in CLUSTER_HINTS:
        if os.environ.get(name):
            return name
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return name
    return None


def init_distributed(args) -> None:
    """jax.distributed.initialize from flags or the cluster environment (before any other JAX call)."""
    import jax

    explicit = args.coordinator is not None or args.num_processes is not None or args.process_id is not None
    if args.distributed == "off":
        return
    if explicit:
        log.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
                 args.coordinator, args.num_processes, args.process_id)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return
    hint = _cluster_detected()
    if args.distributed == "on" or hint:
        log.info("jax.distributed.initialize() from the environment (%s)", hint or "--distributed on")
        jax.distributed.initialize()


def build_config(args):
    from deepseek_vl_jax.training.config import load_config

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.learning_rate is not None:
        overrides.append(f"optimizer.learning_rate={args.learning_rate!r}")
    return load_config(args.config, overrides)


def run(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deepseek_vl_jax").setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    from deepseek_vl_jax.training.config import TrainConfigError
    from deepseek_vl_jax.lora import LoraError
    from deepseek_vl_jax.training.data import BadRowError

    try:
        config = build_config(args)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    init_distributed(args)
    from deepseek_vl_jax.training.loop import train

    try:
        result = train(config, args.model, args.data, args.output, eval_path=args.eval_data)
    except BadRowError as e:
        print(f"error: bad data row {e}", file=sys.stderr)
        return 1
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.losses:
        log.info("done: %d steps, last loss %.4f", len(result.losses), result.losses[-1])
    return 0

"""`deepseek-vl-jax train`: sharded, resumable fine-tuning.

    deepseek-vl-jax train --model DIR --data train.jsonl --output OUT [--config stage3_sft|FILE.json]
        [--steps N] [--batch-size B] [--learning-rate LR] [--eval-data heldout.jsonl] [--set key=value ...]

Running it again with the same OUT resumes from the latest checkpoint, exactly: a resume with settings that would
change the numbers (model, data, batch size, optimizer, schedule, mesh) is refused unless --allow-config-change
(the changes are then recorded in OUT/config_changes.jsonl). SIGINT (Ctrl-C) or SIGTERM (preemption) finishes the
step, saves a checkpoint and exits with status 128 + the signal number; a second one stops at once. Multi-host: start the same command on every
host; `jax.distributed.initialize` runs when --coordinator/--num-processes/--process-id are given, or (with
`--distributed auto`, the default) when a cluster environment is detected (Cloud TPU, SLURM, Open MPI, or
JAX_COORDINATOR_ADDRESS), and it says so in the log.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("deepseek_vl_jax.train")

CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF or Flax checkpoint directory (with the processor files), or "
                                                   "a `train` output directory")
    p.add_argument("--data", required=True, help="training JSONL, one {\"messages\": [...]} chat per line")
    p.add_argument("--output", required=True, help="output directory (resumed if it holds checkpoints)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though settings differ from the checkpoint's (recorded in "
                        "OUT/config_changes.jsonl)")
    p.add_argument("--config", help="training config: a JSON file or a stage name (stage1_aligner, "
                                    "stage2_pretrain, stage3_sft)")
    p.add_argument("--eval-data", help="held-out JSONL; its loss is logged every eval_every steps")
    p.add_argument("--steps", type=int, help="total optimizer steps, >= 1 (sets steps; default: the config's)")
    p.add_argument("--batch-size", type=int, help="rows per optimizer step, all hosts together, >= 1 (sets "
                                                  "data.batch_size; default: the config's)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate in (0, 1] (sets "
                                                       "optimizer.learning_rate; default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optimizer.grad_accum_steps=4 --set mesh.tensor=2")
    g = p.add_argument_group("multi-host")
    g.add_argument("--coordinator", help="coordinator address host:port (process 0's)")
    g.add_argument("--num-processes", type=int, help="how many processes (hosts) in all")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                   help="auto: initialize when flags are given or a cluster environment is detected")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   type=str.upper, help="logging level")


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
        import math

        if not (math.isfinite(args.learning_rate) and 0.0 < args.learning_rate <= 1.0):
            raise ValueError(f"--learning-rate {args.learning_rate!r} is out of range: must be a finite number in "
                             "(0, 1], e.g. 2e-5")
        overrides.append(f"optimizer.learning_rate={args.learning_rate!r}")
    return load_config(args.config, overrides)


def run(args) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("deepseek_vl_jax").setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    from deepseek_vl_jax.training.data import BadRowError
    from deepseek_vl_jax.training.loop import check_paths

    config = build_config(args)  # TrainConfigError (a ValueError): reported by cli.main, exit 2
    check_paths(args.model, args.data, args.output, args.eval_data)
    init_distributed(args)
    from deepseek_vl_jax.training.loop import train

    try:
        result = train(config, args.model, args.data, args.output, eval_path=args.eval_data,
                       allow_config_change=args.allow_config_change)
    except BadRowError as e:
        raise ValueError(f"bad data row {e}; fix or remove that line (or --set data.bad_rows=skip)") from None
    if result.losses:
        log.info("done: %d steps, last loss %.4f", len(result.losses), result.losses[-1])
    if result.stopped_by is not None:
        return 128 + int(result.stopped_by)
    return 0

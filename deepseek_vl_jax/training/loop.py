"""The training loop: build (or restore) the sharded state, stream host batches into global arrays, step, log,
evaluate and checkpoint.

Multi-host: every process runs this same function. Each reads only the rows its devices hold (`local_rows`),
the processes agree on one padded length per step (a small all-gather), and `jax.make_array_from_process_local_data`
joins the hosts' parts into the global batch. Only process 0 writes metrics; all processes save checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_vl_jax import common, sharding
from deepseek_vl_jax.config import ModelConfig
from deepseek_vl_jax.conversion import frozen_base
from deepseek_vl_jax.model import DeepseekVL
from deepseek_vl_jax.processing import load_processor
from deepseek_vl_jax.training import checkpointing, data, flops, interrupt
from deepseek_vl_jax.training import optimizer as opt_lib
from deepseek_vl_jax.training import state as state_lib
from deepseek_vl_jax.training.config import TrainConfig
from deepseek_vl_jax.training.metrics import MetricsLogger
from deepseek_vl_jax.training.step import TrainState, compile_steps

log = logging.getLogger(__name__)

TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


@dataclasses.dataclass
class TrainResult:
    """What a run did: the (1-based) steps it ran this time, their losses, and the final state."""

    steps: list[int]
    losses: list[float]
    state: TrainState
    start_step: int
    stopped_by: int | None = None  # the signal (SIGINT / SIGTERM) that stopped the run early, after a checkpoint


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """[A, B, ...]: the micro-batch axis replicated, B over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(None, (common.DATA, common.FSDP), *([None] * (ndim - 2))))


def local_rows(mesh: Mesh, rows: int) -> slice:
    """The rows [start, stop) of a [A, rows, ...] batch that this process's devices hold."""
    dp = mesh.shape[common.DATA] * mesh.shape[common.FSDP]
    if rows % dp:
        raise ValueError(f"the micro-batch of {rows} rows does not divide over data x fsdp = {dp} devices; "
                         "use a batch size (per micro-batch) that is a multiple of it")
    index_map = batch_sharding(mesh, 2).addressable_devices_indices_map((1, rows))
    spans = sorted({(ix[1].start or 0, rows if ix[1].stop is None else ix[1].stop) for ix in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's devices hold non-contiguous batch rows {spans}; order the mesh's devices "
                         "by process")
    return slice(start, stop)


def model_shapes(model_config: ModelConfig, train: TrainConfig, rows: int, accum: int, pad_id: int) -> data.Shapes:
    v = model_config.vision
    high = None
    if model_config.is_hybrid:
        h = model_config.high_res
        high = (h.num_channels, h.image_size, h.image_size)
    return data.Shapes(accum=accum, rows=rows, max_images=train.data.max_images_per_row,
                       image_shape=(v.num_channels, v.image_size, v.image_size), high_res_shape=high,
                       buckets=train.data.buckets(), pad_id=pad_id)


def agree(length: int, values: Sequence[float] = ()) -> tuple[int, np.ndarray]:
    """(max padded length over processes, per-process sums of `values`) — one all-gather per step."""
    local = np.asarray([float(length), *values], np.float64)
    if jax.process_count() == 1:
        return length, local[1:]
    gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
    return int(gathered[:, 0].max()), gathered[:, 1:].sum(0)


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp)."""
    out = {}
    for k, v in host_batch.items():
        per_row = v.shape[1] // max(host_batch["input_ids"].shape[1], 1)
        shape = (v.shape[0], global_rows * per_row, *v.shape[2:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
    return out


def _mesh_context(mesh: Mesh):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(sharding.axis_rules(mesh))
    return stack


def check_paths(model_dir: str, data_path: str, out_dir: str, eval_path: str | None = None) -> None:
    """ValueError / FileNotFoundError naming the flag, before anything is loaded or written."""
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model {model_dir}: not a model directory (no config.json); pass an HF "
                                "directory, a converted Flax checkpoint or a `train` output directory")
    for flag, path in (("--data", data_path), ("--eval-data", eval_path)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file; give a JSONL file of chats")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--output {out_dir} is a file, not a directory; give a new or existing output directory")


def train(config: TrainConfig, model_dir: str, data_path: str, out_dir: str, eval_path: str | None = None,
          devices: Sequence[jax.Device] | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train from `model_dir` (HF or Flax checkpoint directory with processor files) on `data_path`, writing to
    `out_dir`; resumes from the latest checkpoint in `out_dir` if there is one. A resume whose settings differ from
    the checkpoint's in a way that changes the numbers (model, data, batch size, optimizer, schedule, mesh) raises
    `checkpointing.ResumeError` unless `allow_config_change` (then the changes go to OUT/config_changes.jsonl).
    SIGINT / SIGTERM finish the step, save a checkpoint and return (`TrainResult.stopped_by`)."""
    with interrupt.StopRequest() as stop:
        return _train(config, model_dir, data_path, out_dir, eval_path, devices, allow_config_change, stop)


def _train(config, model_dir, data_path, out_dir, eval_path, devices, allow_config_change, stop) -> TrainResult:
    t_start = time.perf_counter()
    primary = jax.process_index() == 0
    check_paths(model_dir, data_path, out_dir, eval_path)
    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    except ValueError as e:
        raise ValueError(f"mesh {dataclasses.asdict(config.mesh)}: {e}; choose sizes whose product is the device "
                         "count, one of them may be -1 (e.g. --set mesh.fsdp=-1)") from None
    processor = load_processor(model_dir)
    rows = data.read_rows(data_path, config.data.max_images_per_row, config.data.bad_rows)  # bad data fails fast
    meta = {"train_config": config.to_dict(), "process_count": jax.process_count(),
            "fingerprint": checkpointing.run_fingerprint(model_dir, rows.path, dict(mesh.shape))}
    saved = checkpointing.latest_meta(out_dir)
    changes = checkpointing.setting_changes(saved[1], meta) if saved else []
    if changes and not allow_config_change:
        raise checkpointing.ResumeError(
            f"{out_dir} holds a run (checkpoint {saved[0]}) with other settings: {'; '.join(changes)}. A resume "
            "with these would not continue it exactly: use the same settings, a new --output, or "
            "--allow-config-change to resume anyway (the changes are recorded)")
    eval_rows = None
    if eval_path is not None:
        eval_rows = data.read_rows(eval_path, config.data.max_images_per_row, config.data.bad_rows)
    runtime = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   remat_policy=config.model.remat_policy)
    model_config = ModelConfig.from_pretrained(model_dir, **runtime)
    module = DeepseekVL(model_config)
    tx = opt_lib.make_optimizer(config.optimizer, config.steps)
    schedule = opt_lib.learning_rate_schedule(config.optimizer, config.steps)
    qconfig = state_lib.base_quantization(model_config, config.lora, config.trainable, model_dir)  # QLoRA's base
    shardings = state_lib.shardings(model_config, tx, config.trainable, mesh, config.lora, qconfig)
    checkpointing.prepare_output(out_dir, model_dir, processor, config.to_dict())
    if changes:
        checkpointing.record_changes(out_dir, saved[0], changes)
        if primary:
            log.warning("resuming with changed settings (recorded in %s): %s", checkpointing.CHANGES_FILE,
                        "; ".join(changes))
    mgr = checkpointing.manager(out_dir, config.checkpoint)

    latest = mgr.latest_step()
    iterator_state = None
    base = frozen_base.read_record(out_dir, latest) if latest is not None else None
    if latest is None or base is not None:
        from deepseek_vl_jax.pretrained import load_pretrained

        # a QLoRA base is quantized tensor by tensor as it loads: no float copy of it is ever held
        params = load_pretrained(model_dir, mesh=mesh, progress=primary and config.logging.progress, quantize=qconfig,
                                 **runtime).params
    if latest is not None:
        target = state_lib.abstract(model_config, tx, config.trainable, shardings, config.lora, qconfig)
        if base is not None:  # the checkpoint holds the trained leaves; the frozen ones are the base just loaded
            frozen = frozen_base.frozen_part(params, base)
            try:
                frozen_base.check(base, frozen_base.fingerprint(frozen), f"checkpoint {latest} in {out_dir}",
                                  model_dir)
            except frozen_base.BaseChangedError as e:
                raise checkpointing.ResumeError(str(e)) from None
            trained, _ = opt_lib.split(target.params, config.trainable)
            target = target.replace(params=trained)
        try:
            restored, opt_state, iterator_state, _ = checkpointing.restore(mgr, latest, target)
        except (ValueError, KeyError) as e:
            raise checkpointing.ResumeError(f"checkpoint {latest} in {out_dir} does not fit --model {model_dir}: "
                                            f"{e}; use a new --output for another model") from None
        params = restored if base is None else opt_lib.merge(restored, frozen)
        step0 = jax.jit(lambda: jax.numpy.int32(latest), out_shardings=shardings.step)()
        state = TrainState(step0, params, opt_state)
        if primary:
            log.info("resumed from %s at step %d", mgr.directory, latest)
    else:
        if config.lora.enabled:
            params = state_lib.add_lora(params, config.lora, config.trainable, jax.random.key(config.seed), shardings)
        state = state_lib.create(params, tx, config.trainable, shardings)
    start = int(latest or 0)

    accum = config.optimizer.grad_accum_steps
    micro = config.micro_batch_size
    local = local_rows(mesh, micro)
    pad_id = data.default_pad_id(processor)
    shapes = model_shapes(model_config, config, local.stop - local.start, accum, pad_id)
    loader = data.ExampleLoader(processor, rows.path, config.data)
    iterator = data.iterate(data.train_dataset(rows, loader, shapes, config.data, local), config.data)
    if iterator_state is not None:
        iterator.set_state(iterator_state)

    keys = list(TOKEN_KEYS) + (["pixel_values"] if shapes.max_images else []) + (
        ["high_res_pixel_values"] if shapes.max_images and shapes.high_res_shape else [])
    batch_shardings = {k: batch_sharding(mesh, 3 if k in TOKEN_KEYS else 5) for k in keys}
    train_step, eval_step = compile_steps(module, tx, config.trainable, schedule, mesh, shardings, batch_shardings,
                                          config.lora)
    peak = flops.peak_flops(config.logging.peak_flops_per_device) if primary else 1.0
    logger = MetricsLogger(out_dir, primary, config.steps, start, config.logging.tensorboard, config.logging.progress)
    if primary and rows.bad:
        logger.message(f"skipped {len(rows.bad)} bad row(s) of {rows.path}: lines {[e.line for e in rows.bad]}")

    base_record = []  # the frozen leaves never change: their record (a pass over the whole base) is made once

    def save(done: int, force: bool) -> None:
        """A checkpoint of the trained leaves (with frozen ones: a record of the base they are loaded from)."""
        trained, frozen = opt_lib.split(state.params, config.trainable)
        if not frozen:
            checkpointing.save(mgr, done, state, iterator_state, {**meta, "step": done}, force=force)
            return
        if not base_record:
            base_record.append(frozen_base.record(model_dir, frozen, config.model.param_dtype, config.model.dtype,
                                                  qconfig))
        rec = base_record[0]
        checkpointing.save(mgr, done, state, iterator_state, {**meta, "step": done, frozen_base.BASE: rec},
                           force=force, params=trained)

    steps, losses = [], []
    stopped_by = None
    flops.adapter_widths(model_config, config.lora)  # traced here, outside the mesh context (cached)
    try:
        with _mesh_context(mesh):
            for step in range(start, config.steps):
                t0 = time.perf_counter()
                host = next(iterator)
                iterator_state = iterator.get_state()
                skipped = host.pop("skipped_lines")
                step_flops = flops.batch_flops(model_config, config.trainable, host["attention_mask"],
                                               host["input_ids"], config.lora)
                length, (total_flops,) = agree(host["input_ids"].shape[-1], [step_flops])
                host = data.pad_length(host, length, pad_id)
                batch = to_global(host, mesh, micro)
                state, metrics = train_step(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                done = step + 1
                record = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                          "learning_rate": metrics["learning_rate"], "tokens_per_s": metrics["tokens"] / dt,
                          "mfu": total_flops / dt / peak, "step_time_s": dt, "tokens": metrics["tokens"],
                          "seq_len": length}
                steps.append(done)
                losses.append(metrics["loss"])
                if len(skipped):
                    logger.message(f"step {done}: skipped bad row(s) at lines {skipped.tolist()} of {rows.path}")
                if done % config.log_every == 0 or done == config.steps:
                    logger.log(done, record)
                if done % config.checkpoint.every == 0 or done == config.steps:
                    save(done, force=done == config.steps)
                if eval_rows is not None and config.eval_every and (
                        done % config.eval_every == 0 or done == config.steps):
                    result = evaluate_loss(eval_step, state.params, eval_rows, loader, model_config, config, mesh,
                                           pad_id)
                    logger.log(done, result, kind="eval")
                    logger.message(f"step {done}: eval loss {result['loss']:.4f} over {int(result['tokens'])} "
                                   "tokens")
                if done < config.steps and stop.agreed():
                    if done % config.checkpoint.every:
                        save(done, force=True)
                    stopped_by = stop.signum or int(signal.SIGTERM)  # another host was asked
                    logger.message(f"stopped after step {done} ({_signal_name(stop.signum)}): checkpoint {done} "
                                   "saved; run the same command to resume")
                    break
        mgr.wait_until_finished()
    finally:
        mgr.close()
        logger.close()
    if primary:
        log.info("trained steps %d..%d in %.1fs", start + 1, start + len(steps), time.perf_counter() - t_start)
    return TrainResult(steps, losses, state, start, stopped_by)


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "asked by another process"


def evaluate_loss(eval_step, params, rows: data.Rows, loader: data.ExampleLoader, model_config: ModelConfig,
                  config: TrainConfig, mesh: Mesh, pad_id: int) -> dict:
    """Mean loss over every learned target of the held-out rows (one pass, file order)."""
    micro = config.micro_batch_size
    local = local_rows(mesh, micro)
    shapes = model_shapes(model_config, config, local.stop - local.start, 1, pad_id)
    total, count = 0.0, 0.0
    for host in data.iterate(data.eval_dataset(rows, loader, shapes, micro, local), config.data):
        host.pop("skipped_lines")
        length, _ = agree(host["input_ids"].shape[-1])
        out = jax.device_get(eval_step(params, to_global(data.pad_length(host, length, pad_id), mesh, micro)))
        total += float(out["loss_sum"])
        count += float(out["count"])
    return {"loss": total / max(count, 1.0), "tokens": count}


def out_dir_has_checkpoint(out_dir: str) -> bool:
    return os.path.isdir(os.path.join(out_dir, checkpointing.CHECKPOINTS))

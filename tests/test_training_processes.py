"""The `train` command in real processes: two processes (2 simulated devices each, gloo collectives) train to the
same losses as one process with 4 devices; a run killed with SIGKILL mid-training and resumed ends with exactly
the losses of an uninterrupted run."""

import json
import os
import signal
import time

import numpy as np
import pytest

import test_training_helpers as H

STEPS = 10


def common_args(model, data, out, steps):
    # constant learning rate, so a run's total step count does not change its schedule
    return ["--model", model, "--data", data, "--output", out, "--steps", str(steps), "--batch-size", "4",
            "--learning-rate", "1e-3", "--set", "optimizer.min_learning_rate_ratio=1.0",
            "--set", "optimizer.warmup_steps=0", "--set", "mesh.data=1", "--set", "mesh.fsdp=2",
            "--set", "mesh.tensor=2", "--set", "data.max_length=96", "--set", "data.length_buckets=[96]", "--set", "data.num_threads=1",
            "--set", "checkpoint.every=3", "--set", "checkpoint.keep=20", "--set", "logging.progress=false",
            "--set", "logging.peak_flops_per_device=1e9"]


def wait(proc, log, timeout=240):
    try:
        rc = proc.wait(timeout=timeout)
    except Exception:
        proc.kill()
        raise
    assert rc == 0, open(log).read()[-3000:]


def losses(out):
    return {r["step"]: r["loss"] for r in H.read_metrics(out)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model = H.model_dir()
    root = str(tmp_path_factory.mktemp("procs"))
    data = H.write_dataset(os.path.join(root, "data"), n=12)
    out = {k: os.path.join(root, k) for k in ("straight", "multi", "killed")}
    logs = {k: os.path.join(root, k + ".log") for k in ("straight", "multi0", "multi1", "killed", "resumed")}
    port = H.free_port()
    straight = H.start_cli(common_args(model, data, out["straight"], STEPS), 4, logs["straight"])
    multi = [H.start_cli(common_args(model, data, out["multi"], 4) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], 2, logs[f"multi{i}"])
        for i in range(2)]
    wait(straight, logs["straight"])
    for i, p in enumerate(multi):
        wait(p, logs[f"multi{i}"])

    # the same run, but meant to go on for long: SIGKILL once step 4 is logged and checkpoint 3 is committed
    killed = H.start_cli(common_args(model, data, out["killed"], 10_000), 4, logs["killed"])
    metrics_file = os.path.join(out["killed"], "metrics.jsonl")
    committed = os.path.join(out["killed"], "checkpoints", "3")
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if os.path.isdir(committed) and os.path.exists(metrics_file) and any(
                json.loads(line)["step"] >= 4 for line in open(metrics_file) if line.strip().endswith("}")):
            break
        time.sleep(0.02)
    assert killed.poll() is None, open(logs["killed"]).read()[-3000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = losses(out["killed"])
    resumed = H.start_cli(common_args(model, data, out["killed"], STEPS), 4, logs["resumed"])
    wait(resumed, logs["resumed"])
    return out, logs, before


def test_two_processes_match_one(runs):
    out, logs, _ = runs
    one, two = losses(out["straight"]), losses(out["multi"])
    assert sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)
    assert len(set(two.values())) == 4  # the losses really change from step to step
    assert os.path.isfile(os.path.join(out["multi"], "checkpoints", "4", "data_iter", "process_1-of-2.json"))
    assert "jax.distributed.initialize" in open(logs["multi1"]).read()
    assert not os.path.exists(os.path.join(out["multi"], "metrics_1.jsonl"))


def test_killed_and_resumed_run_matches_straight_run(runs):
    out, logs, before = runs
    assert max(before) >= 4  # killed while training, after step 4
    log = open(logs["resumed"]).read()
    assert "resumed from" in log
    resumed_at = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 3 <= resumed_at < STEPS
    want, got = losses(out["straight"]), losses(out["killed"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bit-identical

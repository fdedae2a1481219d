"""The `train` command in real processes: two processes (2 simulated devices each, gloo collectives) train to the
same losses as one process with 4 devices; a run killed with SIGKILL mid-training and resumed ends with exactly
the losses of an uninterrupted run; so does a run stopped with SIGTERM (which saves the step it was at); a resume
with another batch size is refused, and accepted with --allow-config-change (recorded)."""

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
    out = {k: os.path.join(root, k) for k in ("straight", "multi", "killed", "termed")}
    logs = {k: os.path.join(root, k + ".log") for k in ("straight", "multi0", "multi1", "killed", "resumed",
                                                       "termed", "termed_resumed", "refused", "changed")}
    port = H.free_port()
    straight = H.start_cli(common_args(model, data, out["straight"], STEPS), 4, logs["straight"])
    multi = [H.start_cli(common_args(model, data, out["multi"], 4) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], 2, logs[f"multi{i}"])
        for i in range(2)]
    wait(straight, logs["straight"])
    for i, p in enumerate(multi):
        wait(p, logs[f"multi{i}"])

    # the same run, but meant to go on for long: SIGKILL once step 4 is logged and checkpoint 3 is committed;
    # and another one stopped with SIGTERM (preemption) once step 4 is logged
    killed = H.start_cli(common_args(model, data, out["killed"], 10_000), 4, logs["killed"])
    termed = H.start_cli(common_args(model, data, out["termed"], 10_000), 4, logs["termed"])
    pending = {"killed": (killed, signal.SIGKILL), "termed": (termed, signal.SIGTERM)}
    deadline = time.time() + 240
    while pending and time.time() < deadline:
        for name, (proc, sig) in list(pending.items()):
            assert proc.poll() is None, open(logs[name]).read()[-3000:]
            metrics_file = os.path.join(out[name], "metrics.jsonl")
            committed = name == "termed" or os.path.isdir(os.path.join(out[name], "checkpoints", "3"))
            if committed and os.path.exists(metrics_file) and any(
                    json.loads(line)["step"] >= 4 for line in open(metrics_file) if line.strip().endswith("}")):
                proc.send_signal(sig)
                del pending[name]
        time.sleep(0.02)
    assert not pending, "the runs did not reach step 4 in time"
    killed.wait()
    termed_rc = termed.wait(timeout=120)
    before = losses(out["killed"])
    termed_before = losses(out["termed"])
    resumed = H.start_cli(common_args(model, data, out["killed"], STEPS), 4, logs["resumed"])
    wait(resumed, logs["resumed"])
    # resuming the SIGTERM'd run with another batch size: refused, nothing changed; then allowed
    config_before = open(os.path.join(out["termed"], "train_config.json")).read()
    refused = H.start_cli(common_args(model, data, out["termed"], STEPS) + ["--batch-size", "2"], 4, logs["refused"])
    refused_rc = refused.wait(timeout=240)
    config_after_refusal = open(os.path.join(out["termed"], "train_config.json")).read()
    termed_resumed = H.start_cli(common_args(model, data, out["termed"], STEPS), 4, logs["termed_resumed"])
    wait(termed_resumed, logs["termed_resumed"])
    changed = H.start_cli(common_args(model, data, out["termed"], STEPS + 1) + ["--batch-size", "2",
                                                                               "--allow-config-change"],
                          4, logs["changed"])
    wait(changed, logs["changed"])
    termed_info = dict(rc=termed_rc, before=termed_before, refused_rc=refused_rc, config_before=config_before,
                       config_after_refusal=config_after_refusal)
    return out, logs, before, termed_info


def test_two_processes_match_one(runs):
    out, logs, _, _ = runs
    one, two = losses(out["straight"]), losses(out["multi"])
    assert sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)
    assert len(set(two.values())) == 4  # the losses really change from step to step
    assert os.path.isfile(os.path.join(out["multi"], "checkpoints", "4", "data_iter", "process_1-of-2.json"))
    assert "jax.distributed.initialize" in open(logs["multi1"]).read()
    assert not os.path.exists(os.path.join(out["multi"], "metrics_1.jsonl"))


def test_killed_and_resumed_run_matches_straight_run(runs):
    out, logs, before, _ = runs
    assert max(before) >= 4  # killed while training, after step 4
    log = open(logs["resumed"]).read()
    assert "resumed from" in log
    resumed_at = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 3 <= resumed_at < STEPS
    want, got = losses(out["straight"]), losses(out["killed"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bit-identical


def test_sigterm_saves_the_step_and_the_resumed_run_matches_the_straight_run(runs):
    out, logs, _, t = runs
    assert t["rc"] == 128 + signal.SIGTERM, open(logs["termed"]).read()[-3000:]
    stopped = max(t["before"])
    assert stopped >= 4
    log = open(logs["termed"]).read()
    assert f"stopped after step {stopped} (SIGTERM): checkpoint {stopped} saved" in log and "Traceback" not in log
    assert f"resumed from {os.path.join(out['termed'], 'checkpoints')} at step {stopped}" in open(
        logs["termed_resumed"]).read()
    want, got = losses(out["straight"]), losses(out["termed"])
    assert [got[s] for s in range(1, STEPS + 1)] == [want[s] for s in range(1, STEPS + 1)]  # bit-identical


def test_resume_with_another_batch_size_is_refused_unless_allowed(runs):
    out, logs, _, t = runs
    refused = open(logs["refused"]).read()
    assert t["refused_rc"] == 2, refused[-3000:]
    (line,) = [x for x in refused.splitlines() if x.startswith("error: ")]
    assert "data.batch_size: 4 -> 2" in line and "--allow-config-change" in line and "Traceback" not in refused
    assert t["config_after_refusal"] == t["config_before"]
    with open(os.path.join(out["termed"], "config_changes.jsonl")) as f:
        (record,) = [json.loads(x) for x in f]
    assert record == {"resumed_at_step": STEPS, "changes": ["data.batch_size: 4 -> 2"]}
    with open(os.path.join(out["termed"], "train_config.json")) as f:
        assert json.load(f)["data"]["batch_size"] == 2
    assert sorted(losses(out["termed"])) == list(range(1, STEPS + 2))


LORA = ["--set", "lora.rank=4", "--set", "lora.alpha=8.0", "--set", "trainable.vision=false",
        "--set", "trainable.language=false"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """LoRA on the language model + the aligner trained, 4 steps: one process of 4 devices, and two processes of 2
    (all three at once)."""
    model = H.model_dir()
    root = str(tmp_path_factory.mktemp("lora_procs"))
    data = H.write_dataset(os.path.join(root, "data"), n=12)
    out = {k: os.path.join(root, k) for k in ("straight", "multi")}
    logs = {k: os.path.join(root, k + ".log") for k in ("straight", "multi0", "multi1")}
    port = H.free_port()
    procs = {"straight": H.start_cli(common_args(model, data, out["straight"], 4) + LORA, 4, logs["straight"])}
    for i in range(2):
        procs[f"multi{i}"] = H.start_cli(common_args(model, data, out["multi"], 4) + LORA + [
            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)], 2, logs[f"multi{i}"])
    for name, proc in procs.items():
        wait(proc, logs[name])
    return model, out


def test_lora_two_processes_match_one_and_keep_the_base_bit_identical(lora_runs):
    """The same losses; each run's last checkpoint holds only the adapters and the aligner, and the fingerprint of
    the frozen base both runs recorded at step 4 (hashed from their sharded device arrays after training) is that
    of the base freshly loaded here: the base is bit-identical after multi-host LoRA training."""
    from deepseek_vl_jax.conversion import frozen_base, orbax_io
    from deepseek_vl_jax.pretrained import load_pretrained

    model, out = lora_runs
    one, two = losses(out["straight"]), losses(out["multi"])
    assert sorted(two) == [1, 2, 3, 4] and len(set(two.values())) == 4
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5)
    params = load_pretrained(model, progress=False).params
    want = frozen_base.fingerprint({k: params[k] for k in ("language_model", "vision_model")})
    for run in out.values():
        stored = orbax_io.leaf_metadata(os.path.join(run, "checkpoints", "4", "params"))
        assert {p[0] for p in stored} == {"lora", "aligner"}
        rec = frozen_base.read_record(run, 4)
        assert rec["collections"] == ["language_model", "vision_model"] and rec["fingerprint"] == want

"""Preemption of a real Slurm job (see tests/slurm/cluster.sh): a requeued array resumes its trials,
and the time-limit signal checkpoints and requeues. Without Slurm: test_preemption.py."""

import re
import subprocess
from pathlib import Path

from conftest import database, read_trials, submit, trials_dir, wait_for

# --- On a real Slurm ---------------------------------------------------------------------


JOB_ARGS = ["--epochs", "2", "--batch-size", "32"]  # job.sh searches the learning rate itself.


def submit_in_background(slurm_env, job_env, tmp_path, *args, **extra_env):
    """`sbatch --wait` in the background; returns (the Popen, the job id)."""
    sbatch = submit(slurm_env, job_env, tmp_path, *args, **extra_env)
    return sbatch, sbatch.stdout.readline().split()[-1]  # "Submitted batch job N"


def trial_logs(job_env) -> list[str]:
    return [p.read_text() for p in trials_dir(job_env).glob("*/train.log")]


def checkpoints(job_env) -> list[Path]:
    return list(trials_dir(job_env).glob("*/checkpoint.pt"))


def test_requeued_array_resumes_its_trials(slurm_env, job_env, tmp_path):
    sbatch, job_id = submit_in_background(
        slurm_env, job_env, tmp_path, "--array=0-1", "job.sh", *JOB_ARGS,
        ORION_MAX_TRIALS=2,
    )
    wait_for(lambda: len(checkpoints(job_env)) == 2, 600, "both trials' first checkpoint", sbatch)
    requeue = subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    _, stderr = sbatch.communicate(timeout=900)
    assert sbatch.returncode == 0, stderr

    statuses = [t["status"] for t in read_trials(database(job_env), "orion-example")]
    assert sorted(statuses) == ["completed", "completed"], statuses
    logs = trial_logs(job_env)
    assert len(logs) == 2 and all("Resuming training at epoch 1" in log for log in logs), logs
    assert all(log.count("Epoch 0: ") == 1 for log in logs)  # Not retrained from scratch.


def test_time_limit_signal_checkpoints_and_requeues(slurm_env, job_env, tmp_path):
    sbatch, job_id = submit_in_background(slurm_env, job_env, tmp_path, "job.sh", *JOB_ARGS,
                                          ORION_MAX_TRIALS=1)
    wait_for(lambda: len(checkpoints(job_env)) == 1, 600, "the first checkpoint", sbatch)
    # What --signal=B:USR1@120 does 120 s before the time limit: signal the batch shell only.
    signal_batch = subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env,
                                  capture_output=True, text=True)
    assert signal_batch.returncode == 0, signal_batch.stderr
    _, stderr = sbatch.communicate(timeout=900)
    assert sbatch.returncode == 0, stderr

    output = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert f"Time limit near: trials checkpointed; requeueing job {job_id}" in output
    assert [t["status"] for t in read_trials(database(job_env), "orion-example")] == ["completed"]
    [log] = trial_logs(job_env)
    assert re.search(r"saved checkpoint at epoch 1, step \d+", log) and "Resuming training at epoch 1" in log

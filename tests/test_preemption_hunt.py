"""Preemption under plain `orion hunt`, with main.py as the trial: an interrupted trial is resumed by
the next worker, and the trial of a killed worker is finished by another. (Checkpoints and signals
by themselves: test_preemption.py; under Slurm: test_preemption_slurm.py.)"""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import MAIN_PY, REPO_ROOT, clean_env, read_trials, wait_for

# --- Under `orion hunt` ----------------------------------------------------------------


def start_hunt(tmp_path, data_dir, **env):
    """One Oríon worker, as job.sh runs it (trial in the worker process), in its own process group."""
    config = tmp_path / "orion-config.yml"
    config.write_text(
        "experiment:\n  algorithm:\n    random:\n      seed: 1\n  max_trials: 1\n"
        "worker:\n  executor: singleexecutor\n"
    )
    env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=tmp_path / "orion.pkl", **env)
    return subprocess.Popen(
        [REPO_ROOT / ".venv" / "bin" / "orion", "hunt", "-n", "preempt", "--config", config,
         "--working-dir", tmp_path / "trials", sys.executable, MAIN_PY, "--data-dir", data_dir,
         "--epochs", "2", "--batch-size", "32", "--learning-rate~loguniform(1e-4, 1e-2)"],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def trial_log(tmp_path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "trials").glob("*/train.log"))


def test_interrupted_trial_is_resumed_by_the_next_worker(data_dir, tmp_path):
    worker = start_hunt(tmp_path, data_dir)
    wait_for(lambda: "Epoch 0: " in trial_log(tmp_path), 300, "the first epoch")
    os.killpg(worker.pid, signal.SIGTERM)  # What Slurm does to every process of a step.
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, output
    assert [t["status"] for t in read_trials(tmp_path / "orion.pkl")] == ["interrupted"]

    next_worker = start_hunt(tmp_path, data_dir)
    output, _ = next_worker.communicate(timeout=600)
    assert next_worker.returncode == 0, output
    assert [t["status"] for t in read_trials(tmp_path / "orion.pkl")] == ["completed"]
    assert re.search(r"Resuming training at epoch 1", trial_log(tmp_path))
    assert len(re.findall(r"Epoch 0: ", trial_log(tmp_path))) == 1  # Epoch 0 not redone.


def test_trial_of_a_killed_worker_is_finished_by_another(data_dir, tmp_path):
    worker = start_hunt(tmp_path, data_dir)
    wait_for(lambda: any((tmp_path / "trials").glob("*/checkpoint.pt")), 300, "the first checkpoint")
    os.killpg(worker.pid, signal.SIGKILL)  # A node failure: no signal handler runs.
    worker.communicate(timeout=60)
    assert [t["status"] for t in read_trials(tmp_path / "orion.pkl")] == ["reserved"]

    # With ORION_HEARTBEAT=2 a trial is lost after 5 x 2 s without a heartbeat. (Only for
    # this test: Oríon writes heartbeats every 60 s, so live trials need 5 x ORION_HEARTBEAT > 60.)
    time.sleep(11)
    next_worker = start_hunt(tmp_path, data_dir, ORION_HEARTBEAT=2)
    output, _ = next_worker.communicate(timeout=600)
    assert next_worker.returncode == 0, output
    trials = read_trials(tmp_path / "orion.pkl")
    assert [t["status"] for t in trials] == ["completed"]
    assert "Resuming training at epoch 1" in trial_log(tmp_path)

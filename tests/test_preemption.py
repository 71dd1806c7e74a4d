"""Preemption: checkpoints, resuming, SIGTERM; a full disk, a second writer, the GPU out of memory.
(Under `orion hunt`: test_preemption_hunt.py; under Slurm: test_preemption_slurm.py.)"""

import multiprocessing
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
import trial_support

from conftest import (EPOCH_LINE, MAIN_PY, OBJECTIVE_LINE, REPO_ROOT, clean_env, learning_curve, read_metrics,
                      run_main, wait_for)

# The sample (450 training images for CIFAR-10) in batches of 32: a few seconds per epoch on this CPU.
TRAIN_ARGS = ["--epochs", "2", "--batch-size", "32", "--learning-rate", "1e-3"]


def log_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    trial_dir = tmp_path_factory.mktemp("reference")
    result = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", trial_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, trial_dir


def test_sigterm_mid_epoch_then_resume_reproduces_the_run(data_dir, tmp_path, uninterrupted):
    log = tmp_path / "train.log"
    process = subprocess.Popen(
        [sys.executable, MAIN_PY, "--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path],
        env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for(lambda: "Epoch 0 trained in" in log_text(log), 300, "the first epoch")
    time.sleep(1)  # Into epoch 1 (the signal is handled wherever it lands, even at step 0).
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output  # Oríon's "interrupted" code.
    saved = re.search(r"saved checkpoint at epoch (\d+), step (\d+)", output)
    assert saved, output
    assert int(saved[1]) == 1 and int(saved[2]) < 15  # Within epoch 1, not at its end.

    resumed = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    step = f", step {saved[2]}" if int(saved[2]) else ""
    assert re.search(rf"Resuming training at epoch 1{step}\s", resumed.stdout)
    # Bit-identical: the same losses and accuracies for every epoch.
    assert learning_curve(tmp_path) == learning_curve(uninterrupted[1])
    assert OBJECTIVE_LINE.findall(resumed.stdout) == OBJECTIVE_LINE.findall(uninterrupted[0])


def test_finished_checkpoint_reports_without_retraining(data_dir, tmp_path, uninterrupted):
    first = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path)
    again = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path)
    assert again.returncode == 0
    assert "Resuming training at epoch 2" in again.stdout
    assert EPOCH_LINE.findall(again.stdout) == []  # Nothing trained again.
    assert OBJECTIVE_LINE.findall(again.stdout) == OBJECTIVE_LINE.findall(first.stdout)


def test_unreadable_checkpoint_warns_and_starts_over(data_dir, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = run_main("--data-dir", data_dir, "--epochs", "1", "--checkpoint-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Cannot read checkpoint" in result.stdout
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["training_state"]["epoch"] == 1  # Replaced.


def test_checkpoint_of_another_run_is_refused(data_dir, tmp_path):
    assert run_main("--data-dir", data_dir, "--epochs", "1", "--checkpoint-dir", tmp_path).returncode == 0
    other = run_main("--data-dir", data_dir, "--epochs", "1", "--learning-rate", "0.1",
                     "--checkpoint-dir", tmp_path)
    assert other.returncode == 1
    assert other.stderr.startswith(f"error: {tmp_path / 'checkpoint.pt'} belongs to another run")
    assert other.stderr.count("\n") == 1  # One line: no traceback.


@pytest.mark.parametrize(
    "content",
    [
        {"run_identity": {}, "epoch": 1, "model": {}},  # What main.py saved before checkpoint format 2.
        {"format": 2},  # Keys missing.
        [1, 2, 3],  # Not even a dict.
    ],
)
def test_checkpoint_of_another_format_is_refused_in_one_line(data_dir, tmp_path, content):
    torch.save(content, tmp_path / "checkpoint.pt")
    result = run_main("--data-dir", data_dir, "--epochs", "1", "--checkpoint-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"error: {tmp_path / 'checkpoint.pt'} was not written by this version of main.py: "
                             "delete it to start this trial over, or pass another --checkpoint-dir\n")


def test_checkpoint_that_is_a_folder_is_refused_in_one_line(data_dir, tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    result = run_main("--data-dir", data_dir, "--epochs", "1", "--checkpoint-dir", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'checkpoint.pt'} is a folder, not a checkpoint")


def test_metrics_file_follows_the_checkpoint(data_dir, tmp_path, uninterrupted):
    # A run killed between the checkpoint and its metrics file: the next run rewrites them.
    shutil.copy(uninterrupted[1] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    result = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert learning_curve(tmp_path) == learning_curve(uninterrupted[1])


def test_promotion_to_more_epochs_equals_training_straight_there(data_dir, tmp_path, uninterrupted):
    # What a multi-fidelity algorithm (ASHA) does: the same configuration at a higher
    # fidelity, in a copy of the lower rung's folder (Oríon copies a trial's parent's folder).
    lower_rung = run_main("--data-dir", data_dir, *TRAIN_ARGS[2:], "--epochs", "1", "--checkpoint-dir", tmp_path)
    assert lower_rung.returncode == 0, lower_rung.stdout + lower_rung.stderr
    promoted = run_main("--data-dir", data_dir, *TRAIN_ARGS, "--checkpoint-dir", tmp_path)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "Resuming training at epoch 1" in promoted.stdout
    assert learning_curve(tmp_path) == learning_curve(uninterrupted[1])


# --- A full disk during a checkpoint -------------------------------------------------------


def model_to_save(folder):
    """What save_checkpoint_and_metrics needs for a run in `folder`: (args, model, optimizer)."""
    args = main.parse_args(["--checkpoint-dir", str(folder)])
    model = torch.nn.Linear(64, 8)  # Any model: the checkpoint does not depend on it.
    return args, model, torch.optim.AdamW(model.parameters())


@pytest.fixture
def full_disk(tmp_path):
    """A checkpoint folder whose every checkpoint write fails with "No space left on device"."""
    # The temporary file this process writes the checkpoint to, before renaming it.
    trial_support.temporary_path(tmp_path / "checkpoint.pt").symlink_to("/dev/full")
    return tmp_path, *model_to_save(tmp_path)


def test_full_disk_during_a_checkpoint_is_a_warning_not_a_crash(full_disk):
    folder, args, model, optimizer = full_disk
    assert trial_support.save_checkpoint_and_metrics(folder, trial_support.TrainingState(), model, optimizer, args) is False


def test_full_disk_leaves_no_temporary_file(full_disk):
    folder, args, model, optimizer = full_disk
    trial_support.save_checkpoint_and_metrics(folder, trial_support.TrainingState(), model, optimizer, args)
    assert sorted(p.name for p in folder.iterdir()) == []


def test_full_disk_on_preemption_still_exits_as_interrupted(full_disk):
    folder, args, model, optimizer = full_disk
    with pytest.raises(SystemExit) as exit_info:
        trial_support.save_and_exit_interrupted(folder, trial_support.TrainingState(), model, optimizer, args, signal.SIGTERM)
    assert exit_info.value.code == 130  # Oríon's "interrupted": resumed later, not counted as broken.


def test_full_disk_while_writing_metrics_keeps_the_previous_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0}\n')
    trial_support.temporary_path(tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    trial_support.write_metrics(tmp_path, trial_support.TrainingState(history=[{"epoch": 0}, {"epoch": 1}]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # No temporary file left.
    assert read_metrics(tmp_path) == [{"epoch": 0}]


# --- A second worker on the same trial ---------------------------------------------------


def write_half_a_checkpoint(folder: Path, half_written, finish) -> None:
    """Another worker's checkpoint save, paused half-way (as main.py names its temporary file)."""
    with open(trial_support.temporary_path(folder / "checkpoint.pt"), "wb") as file:
        file.write(b"1" * 2**20)  # Past the start of the model's weights in a checkpoint.
        file.flush()
        half_written.set()
        finish.wait(60)
        file.write(b"2" * 2**20)


def test_a_second_worker_writing_the_same_trial_cannot_corrupt_its_checkpoint(tmp_path):
    # A lost heartbeat: Oríon hands a still-running trial to a second worker, and both save
    # into the same folder at once. A shared temporary file would mix the two writes.
    fork = multiprocessing.get_context("fork")  # The other worker: main.py already imported, another pid.
    half_written, finish = fork.Event(), fork.Event()
    other_worker = fork.Process(target=write_half_a_checkpoint, args=(tmp_path, half_written, finish))
    other_worker.start()
    assert half_written.wait(60)
    args, model, optimizer = model_to_save(tmp_path)
    assert trial_support.save_checkpoint_and_metrics(tmp_path, trial_support.TrainingState(), model, optimizer, args) is True
    finish.set()
    other_worker.join(60)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(saved[name], weights) for name, weights in model.state_dict().items())


# --- The GPU runs out of memory ----------------------------------------------------------

# What torch raises when an allocation does not fit in the GPU's memory (its message, cut short).
OUT_OF_MEMORY = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB of "
                 "which 1.06 GiB is free. Process 4242 has 27.52 GiB memory in use.")


def run_main_out_of_memory(*args) -> subprocess.CompletedProcess:
    """Runs main.py as run_main does, except that its training step raises CUDA's out-of-memory error.

    A CPU cannot run out of GPU memory; everything but the failing step is main.py's own run.
    """
    program = ("import sys, torch, main\n"
               "def train_step(*args, **kwargs):\n"
               f"    raise torch.cuda.OutOfMemoryError({OUT_OF_MEMORY!r})\n"
               "main.train_step = train_step\n"
               "main.main()\n")
    return subprocess.run([sys.executable, "-c", program, *map(str, args)], env=clean_env(), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def out_of_memory(data_dir, tmp_path_factory, uninterrupted):
    """A trial resumed from a checkpoint (to train one more epoch) whose first step runs out of GPU memory."""
    trial_dir = tmp_path_factory.mktemp("out-of-memory")
    shutil.copy(uninterrupted[1] / "checkpoint.pt", trial_dir / "checkpoint.pt")
    result = run_main_out_of_memory("--data-dir", data_dir, *TRAIN_ARGS[2:], "--epochs", "3",
                                    "--checkpoint-dir", trial_dir)
    return result, trial_dir


def test_gpu_out_of_memory_is_one_error_line(out_of_memory):
    result, _ = out_of_memory
    assert result.returncode == 1  # Broken: this configuration does not fit.
    assert result.stderr.count("\n") == 1  # One line: no traceback.
    assert result.stderr.startswith(
        "error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): "
        "lower --batch-size, or run fewer trials per GPU (--ntasks-per-gpu)"
    )


def test_gpu_out_of_memory_is_in_the_trials_log(out_of_memory):
    _, trial_dir = out_of_memory
    assert "ERROR error: the GPU ran out of memory" in (trial_dir / "train.log").read_text()


def test_gpu_out_of_memory_keeps_the_last_checkpoint(out_of_memory, uninterrupted):
    _, trial_dir = out_of_memory
    assert (trial_dir / "checkpoint.pt").read_bytes() == (uninterrupted[1] / "checkpoint.pt").read_bytes()
    assert sorted(p.name for p in trial_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "train.log"]

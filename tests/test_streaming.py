"""Data larger than the memory a trial is allowed: docs/make-it-yours.md's photos example, streamed from disk.

The photos module of docs/make-it-yours.md (torchvision's ImageFolder in DataLoader workers) on a generated folder of
photos four times the memory the trial may use: main.py runs in a memory cgroup whose limit the
kernel enforces (a trial that held the data set would be killed), trains, is stopped by SIGTERM mid
epoch and resumes to exactly the uninterrupted run's learning curve. The model is a tiny one (this
is about the data's path, not the model's speed); everything else is main.py's own code.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT, clean_env, learning_curve, read_metrics, wait_for
from test_make_it_yours import worked_example

ALLOWED = 512 * 2**20  # The memory cgroup's limit: about what torch, the model and two workers need.
CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory controller, as on this project's machines.
PROGRAM = """
import sys
sys.path[:0] = [{module_dir!r}, {repo!r}]
import torch
import main, photos
main.dataset = photos
main.build_model = lambda args, data: torch.nn.Sequential(
    torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, data.classes))
main.main()
"""
ARGS = ["--epochs", "2", "--batch-size", "8", "--loader-workers", "2", "--augment", "--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def cgroup():
    """A memory cgroup limited to ALLOWED bytes, for the trials of this module."""
    folder = CGROUPS / f"orion-example-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(ALLOWED))
    except OSError as error:
        message = f"no memory cgroup to limit a trial's memory ({error}): needs root and cgroup v1's memory controller"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield folder
    for _ in range(50):  # Its processes may take a moment to leave.
        try:
            folder.rmdir()
            break
        except OSError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path, int]:
    """(the photos module's folder, a --data-dir holding photos 4 x ALLOWED in size, their size in bytes)."""
    folder = tmp_path_factory.mktemp("photos")
    name, module, _, _ = worked_example("a folder of photos")
    (folder / f"{name}.py").write_text(module)
    # Uncompressed 1024 x ~1000 BMP files: on disk as large as decoded, about 3 MB each.
    program = (f"import sys; sys.path.insert(0, {str(folder)!r}); import photos; from pathlib import Path; "
               f"photos.write_sample(Path({str(folder / 'data')!r}), 800, image_size=1024, image_format='bmp')")
    subprocess.run([sys.executable, "-c", program], check=True, timeout=600)
    size = sum(p.stat().st_size for p in (folder / "data").rglob("*") if p.is_file())
    return folder, folder / "data", size


def start_trial(cgroup: Path, photos, checkpoint_dir: Path) -> subprocess.Popen:
    module_dir, data_dir, _ = photos
    program = PROGRAM.format(module_dir=str(module_dir), repo=str(REPO_ROOT))
    # The shell joins the cgroup, then becomes the trial: the trial and its workers are limited from the start.
    command = shlex.join([sys.executable, "-c", program, "--data-dir", str(data_dir), "--checkpoint-dir",
                          str(checkpoint_dir), *ARGS])
    command = f"echo $$ > {cgroup}/cgroup.procs && exec {command}"
    return subprocess.Popen(["bash", "-c", command], env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def uninterrupted(cgroup, photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    process = start_trial(cgroup, photos, folder)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output, folder


def test_the_data_set_is_four_times_the_memory_the_trial_is_allowed(photos):
    assert photos[2] >= 4 * ALLOWED


def test_a_trial_streams_it_within_its_memory_and_learns(cgroup, uninterrupted, photos):
    output, folder = uninterrupted
    # The trial's memory was charged to the cgroup (so the kernel held it to ALLOWED), up to the limit.
    assert 200 * 2**20 < int((cgroup / "memory.max_usage_in_bytes").read_text()) <= ALLOWED
    assert "streamed from disk by 2 DataLoader worker(s)" in output
    records = read_metrics(folder)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[-1]["objective"] < records[-1]["untrained_objective"]
    # The trial's own peak (ru_maxrss, shared library pages included) is a fraction of the data set.
    assert max(r["peak_host_gib"] for r in records) * 2**30 < photos[2] / 2


def test_sigterm_mid_epoch_then_resume_reproduces_the_run(cgroup, photos, uninterrupted, tmp_path):
    process = start_trial(cgroup, photos, tmp_path)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), 300, "the first epoch")
    time.sleep(0.3)  # Into epoch 1 (58 steps of ~20 ms): the signal is acted on between two of its steps.
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "saved checkpoint at epoch 1, step" in output
    resumed = start_trial(cgroup, photos, tmp_path)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "Resuming training at epoch 1, step" in output
    assert learning_curve(tmp_path) == learning_curve(uninterrupted[1])

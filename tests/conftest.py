"""Shared fixtures: the generated CIFAR-10 look-alike and helpers to run main.py and Oríon."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_lookalike import write_cifar10_lookalike

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_PY = REPO_ROOT / "main.py"
# Small enough that one CPU epoch takes a few seconds, learnable enough to beat chance.
IMAGES_PER_BATCH = 100  # x5 training batches -> 450 train / 50 validation images.


@pytest.fixture(scope="session")
def cifar_data_dir(tmp_path_factory) -> Path:
    """A --data-dir holding cifar-10-batches-py/ (read-only use: copy it before changing it)."""
    data_dir = tmp_path_factory.mktemp("data")
    write_cifar10_lookalike(data_dir, images_per_batch=IMAGES_PER_BATCH)
    return data_dir


def clean_env(**overrides) -> dict:
    """The environment for a child process, without Oríon or Slurm variables leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORION_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_main(*args, env=None, timeout=600, **popen_kwargs) -> subprocess.CompletedProcess:
    """Runs main.py in a fresh Python process (as Oríon does) and captures its output."""
    return subprocess.run(
        [sys.executable, str(MAIN_PY), *map(str, args)],
        env=env if env is not None else clean_env(),
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **popen_kwargs,
    )

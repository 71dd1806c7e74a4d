"""job.sh: on a real single-node Slurm cluster (see tests/slurm/cluster.sh), and without Slurm."""

import os
import re
import shlex
import shutil
import subprocess

import pytest

from cifar10_lookalike import write_cifar10_archive
from conftest import REPO_ROOT, clean_env, database, read_trials, sbatch_wait

README = REPO_ROOT / "README.md"


def readme_commands(program: str) -> list[str]:
    """The `program ...` lines of the README's code blocks, without trailing comments."""
    commands, in_code = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.strip().removeprefix("$ ").startswith(program + " "):
            commands.append(line.strip().removeprefix("$ ").split(" #")[0].strip())
    return commands


# --- On a real Slurm ---------------------------------------------------------------------


def test_readme_sbatch_commands_are_accepted_by_slurm(slurm_env):
    commands = readme_commands("sbatch")
    assert len(commands) >= 3 and any("--ntasks-per-gpu=5" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        result = subprocess.run(
            [argv[0], "--test-only", *argv[1:]], env=slurm_env, cwd=REPO_ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert "to start at" in result.stderr


def test_array_job_runs_the_search_and_readme_commands_show_it(slurm_env, job_env, tmp_path):
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, "--array=1-3", "job.sh", "--epochs", "1",
                               ORION_MAX_TRIALS=3)
    assert code == 0, output
    trials = read_trials(database(job_env), "orion-example")
    statuses = [t["status"] for t in trials]
    assert statuses.count("completed") >= 3 and "broken" not in statuses, statuses
    params = [tuple(p["value"] for p in t["params"]) for t in trials]
    assert len(set(params)) == len(params)  # No trial run twice.
    # Each trial's own log, in its persistent working directory in $SCRATCH.
    logs = list((job_env["SCRATCH"] / "orion-example" / "orion-example").glob("*/train.log"))
    assert len(logs) == len(trials) and all("Epoch 0: Val loss" in log.read_text() for log in logs)

    # The README's result commands, as written, from the repo root: they find the database
    # through the global Oríon config that job.sh wrote.
    env = {**clean_env(), **{k: str(v) for k, v in job_env.items()}}
    for command in readme_commands("uv run orion"):
        result = subprocess.run(shlex.split(command), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        if " info " in command:
            assert "orion-example" in result.stdout and "completed" in result.stdout
    png = REPO_ROOT / "orion-example-v1_regret.png"
    try:
        assert png.read_bytes().startswith(b"\x89PNG")
    finally:
        png.unlink(missing_ok=True)


def test_five_workers_share_one_gpu_concurrently(slurm_env, job_env, tmp_path):
    [command] = [c for c in readme_commands("sbatch") if "--ntasks-per-gpu=5 --cpus-per-task" in c]
    args = [a for a in shlex.split(command)[1:] if not a.startswith("--array")]
    # Small data, small batches: five trials share this machine's two cores.
    write_cifar10_archive(tmp_path / "datasets", images_per_batch=20)
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, *args, "--epochs", "1", "--batch-size", "32",
                               ORION_MAX_TRIALS=5)
    assert code == 0, output
    trials = read_trials(database(job_env), "orion-example")
    assert [t["status"] for t in trials] == ["completed"] * 5  # Exactly the budget: no overshoot.
    # Five trials ran at the same time: each of them started before any of them ended.
    first_five = sorted(trials, key=lambda t: t["start_time"])[:5]
    assert max(t["start_time"] for t in first_five) < min(t["end_time"] for t in first_five)


def test_job_whose_trials_break_fails(slurm_env, job_env, tmp_path):
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, "job.sh", "--epochs", "1",
                               "--data-dir", tmp_path / "nowhere", ORION_MAX_TRIALS=1)
    assert code != 0
    assert re.search(r"error: \d+ trial\(s\) of this job broke", output), output
    assert "CIFAR-10 not found in" in "".join(
        p.read_text() for p in (job_env["SCRATCH"] / "orion-example").glob("*/*/train.log"))


# --- Without Slurm -------------------------------------------------------------------------


def bash_job(job_env, *args, timeout=600, **extra_env):
    env = clean_env(**{**job_env, **extra_env})
    return subprocess.run(["bash", "job.sh", *map(str, args)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_runs_outside_slurm_on_a_workstation(job_env):
    result = bash_job(job_env, "--epochs", "1", ORION_MAX_TRIALS=1)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = read_trials(database(job_env), "orion-example")
    assert [t["status"] for t in trials] == ["completed"]


def test_missing_archive_offline_names_cifar10_archive(job_env, tmp_path):
    result = bash_job({**job_env, "CIFAR10_ARCHIVE": tmp_path / "missing.tar.gz"},
                      CIFAR10_URL=f"file://{tmp_path}/unreachable")  # A download that fails, offline.
    assert result.returncode != 0
    assert f"error: CIFAR10_ARCHIVE={tmp_path}/missing.tar.gz does not exist and the download failed" in result.stderr
    assert "export CIFAR10_ARCHIVE=" in result.stderr


def test_downloaded_archive_with_wrong_md5_is_refused(job_env, tmp_path):
    # A "download" (from a local file) of a look-alike: it is not the official archive.
    result = bash_job({**job_env, "CIFAR10_ARCHIVE": tmp_path / "missing.tar.gz"},
                      CIFAR10_URL=f"file://{job_env['CIFAR10_ARCHIVE']}")
    assert result.returncode != 0
    assert "is not the official archive (MD5 mismatch)" in result.stderr


def test_job_sh_is_shellcheck_clean():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0 and not os.environ.get("CI"):
            pytest.skip("shellcheck is missing (apt-get install shellcheck)")
        subprocess.run("apt-get install -y shellcheck || (apt-get update && apt-get install -y shellcheck)",
                       shell=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    result = subprocess.run(["shellcheck", "job.sh", "tests/slurm/cluster.sh"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout

"""job.sh on a real single-node Slurm cluster (see tests/slurm/cluster.sh); ASHA: test_job_asha.py, without
Slurm: test_job_dry_run.py."""

import re
import shlex
import subprocess
from pathlib import Path

from conftest import (REPO_ROOT, database, job_environment, make_job_env, read_trials, readme_commands, sbatch_wait,
                      trials_dir)

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
    assert [t["status"] for t in trials] == ["completed"] * 3
    # Each trial's own log, in its persistent working directory in $SCRATCH: one run of
    # main.py each (a trial run twice, even at once, would log twice), one epoch each.
    logs = [log.read_text() for log in trials_dir(job_env).glob("*/train.log")]
    assert [log.count("Args: ") for log in logs] == [1, 1, 1]
    assert [log.count("Epoch 0: ") for log in logs] == [1, 1, 1]
    # The search's report, made once (by the first task to end after the search is done), not by
    # each of the three; the others say who made it.
    assert output.count("Report of Oríon experiment orion-example") == 1, output
    ended_before = output.count("The search is not done: no report yet")
    assert output.count("The report of this search is made once, by Slurm job ") == 2 - ended_before, output

    # The README's result commands, as written, from the repo root: they find the database
    # through the global Oríon config that job.sh wrote.
    env = job_environment(job_env)
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
    job_env = make_job_env(tmp_path, size=100)
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
    # The worker stops after Oríon's worker.max_broken (3) broken trials; the experiment goes on
    # until max_broken (10).
    assert re.search(r"error: \d+ trial\(s\) of this job broke; their logs are in \S+/<trial id>/train.log", output)
    assert re.search(r"error: experiment orion-example has \d+ broken trial\(s\); at 10 \(max_broken\)", output)
    assert "orion db rm orion-example --status broken --force" in output
    assert "error: " in "".join(p.read_text() for p in trials_dir(job_env).glob("*/train.log"))
    assert str(tmp_path / "nowhere") in "".join(p.read_text() for p in trials_dir(job_env).glob("*/train.log"))
    # Each broken trial's one error line, once; Oríon's runner traceback only in the worker's log.
    [line] = {line for line in output.splitlines() if line.startswith("error: ") and "nowhere" in line}
    assert output.count(line) == len(list(trials_dir(job_env).glob("*/train.log")))
    assert "Traceback" not in output and "ExecutionError" not in output
    [worker_log] = (Path(job_env["SCRATCH"]) / "orion-example" / "workers").glob("*/*.log")
    assert "ExecutionError" in worker_log.read_text()


def test_unset_scratch_is_refused(slurm_env, job_env, tmp_path):
    without_scratch = {k: v for k, v in slurm_env.items() if k != "SCRATCH"}
    code, output = sbatch_wait(without_scratch, {k: v for k, v in job_env.items() if k != "SCRATCH"}, tmp_path,
                               "job.sh", "--epochs", "1")
    assert code == 1, output
    assert "error: $SCRATCH is not set: export SCRATCH=" in output

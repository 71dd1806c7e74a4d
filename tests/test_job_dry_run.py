"""job.sh without Slurm (a dry run, `bash job.sh`): the search, reruns, and what it refuses before any trial."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from orion.client import get_experiment

import orion_tools

from conftest import REPO_ROOT, database, job_environment, make_job_env, read_trials, trials_dir

# --- Without Slurm -------------------------------------------------------------------------


def bash_job(job_env, *args, timeout=600, **extra_env):
    env = job_environment(job_env, **extra_env)
    return subprocess.run(["bash", "job.sh", *map(str, args)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash job.sh --epochs 1` (one trial) with $SCRATCH set: (job_env, its result, its trials).

    Tests may run job.sh again on its database (the trials are those of this first run).
    """
    job_env = make_job_env(tmp_path_factory.mktemp("dry-run"))
    result = bash_job(job_env, "--epochs", "1", ORION_MAX_TRIALS=1)
    assert result.returncode == 0, result.stdout + result.stderr
    return job_env, result, read_trials(database(job_env, dry_run=True), "orion-example")


def test_runs_outside_slurm_on_a_workstation(dry_run):
    _, _, trials = dry_run
    assert [t["status"] for t in trials] == ["completed"]


def test_a_synced_environment_is_used_as_it_is(dry_run):
    # The test command synced and compiled it (README, "Tests"): no second sync, no bytecode pass.
    _, result, _ = dry_run
    assert "The environment (.venv) is out of date" not in result.stdout


def test_dry_run_leaves_the_real_search_alone(dry_run):
    job_env, _, _ = dry_run
    assert sorted(p.name for p in Path(job_env["SCRATCH"]).iterdir()) == ["orion-example-dry-run"]


def test_dry_run_leaves_orions_global_config_alone(dry_run):
    job_env, _, _ = dry_run
    assert not (Path(job_env["XDG_CONFIG_HOME"]) / "orion.core" / "orion_config.yaml").exists()


def test_dry_run_says_how_to_see_its_trials(dry_run):
    job_env, result, _ = dry_run
    [command] = re.findall(r"^Dry run: .* See them with: (.*)$", result.stdout, re.MULTILINE)
    info = subprocess.run(command, shell=True, env=job_environment(job_env), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "name: orion-example" in info.stdout  # This experiment...
    assert re.search(r"^trials completed: [1-9]", info.stdout, re.MULTILINE), info.stdout  # ... with its trials.


def trials_of(job_env) -> list[dict]:
    return read_trials(database(job_env, dry_run=True), "orion-example")


def test_rerun_with_other_main_py_arguments_is_refused(dry_run):
    job_env, _, _ = dry_run
    trials_before = trials_of(job_env)
    result = bash_job(job_env, "--epochs", "2")
    assert result.returncode == 1
    assert "(main.py arguments: was `--epochs 1`, now `--epochs 2`)" in result.stderr
    assert "for a new search, export ORION_EXPERIMENT=<a new name>; to continue this one, run job.sh with its " \
           "original settings" in result.stderr
    assert trials_of(job_env) == trials_before


def test_rerun_with_another_algorithm_is_refused(dry_run):
    job_env, _, _ = dry_run
    trials_before = trials_of(job_env)
    result = bash_job(job_env, ALGORITHM="asha")  # No --epochs: ASHA searches it.
    assert result.returncode == 1
    assert "algorithm: was tpe, now asha" in result.stderr
    assert trials_of(job_env) == trials_before


def test_rerun_with_a_larger_budget_and_other_workers_extends_the_search(dry_run):
    # Another number of workers changes TPE's n_initial_points: the experiment keeps its own
    # (Oríon would stop every worker with "Algorithm configuration changed").
    job_env, _, _ = dry_run
    trials_before = trials_of(job_env)
    result = bash_job(job_env, "--epochs", "1", ORION_MAX_TRIALS=len(trials_before) + 1, TPE_N_INITIAL_POINTS=7)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "continues with its algorithm's own settings: n_initial_points 5 (this job's: 7)" in result.stderr
    trials = trials_of(job_env)
    assert [t["status"] for t in trials] == ["completed"] * (len(trials_before) + 1)
    experiment = get_experiment("orion-example", storage=orion_tools.storage(database(job_env, dry_run=True)))
    assert experiment.version == 1  # One experiment, not branched.


def test_rerun_of_an_asha_search_extends_it(tmp_path):
    # What the second job of an ASHA array does: continue the experiment with its algorithm's
    # stored configuration, whose `repetitions` is infinite.
    job_env = make_job_env(tmp_path, size=100)
    for budget in (1, 2):
        result = bash_job(job_env, "--batch-size", "32", ALGORITHM="asha", ORION_MAX_TRIALS=budget)
        assert result.returncode == 0, result.stdout + result.stderr
    assert [t["status"] for t in trials_of(job_env)] == ["completed", "completed"]


def test_job_sh_is_shellcheck_clean():
    if not shutil.which("shellcheck"):
        if os.geteuid() != 0 and not os.environ.get("CI"):
            pytest.skip("shellcheck is missing (apt-get install shellcheck)")
        subprocess.run("apt-get install -y shellcheck || (apt-get update && apt-get install -y shellcheck)",
                       shell=True, capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    result = subprocess.run(["shellcheck", "job.sh", "tests/slurm/cluster.sh"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_unknown_main_py_argument_is_refused_before_any_trial(job_env):
    result = bash_job(job_env, "--fooo", "1")
    assert result.returncode == 2
    assert ("error: main.py refuses the arguments after job.sh (unrecognized arguments: --fooo 1): correct them "
            "and submit again\n") in result.stderr
    assert not Path(database(job_env, dry_run=True)).exists()  # No trial, no experiment.


def test_searched_argument_after_job_sh_is_refused(job_env):
    result = bash_job(job_env, "--learning-rate", "0.1")
    assert result.returncode == 1
    assert "error: --learning-rate cannot follow job.sh" in result.stderr


def test_epochs_after_job_sh_with_asha_is_refused(job_env):
    result = bash_job(job_env, "--epochs", "3", ALGORITHM="asha")  # ASHA's fidelity.
    assert result.returncode == 1
    assert "error: --epochs cannot follow job.sh" in result.stderr


@pytest.mark.parametrize("heartbeat", ["3", "08", "99999999999999999999", "30s"])
def test_heartbeat_out_of_range_is_refused(job_env, heartbeat):
    result = bash_job(job_env, ORION_HEARTBEAT=heartbeat)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: ORION_HEARTBEAT={heartbeat}: use a whole number of seconds from 5 to 9999 (docs/preemption.md), "
        "e.g. the default, 30")


def test_budget_that_is_not_a_number_is_refused(job_env):
    result = bash_job(job_env, ORION_MAX_TRIALS="ten")
    assert result.returncode == 1
    assert "ORION_MAX_TRIALS=ten" in result.stderr


def test_unknown_algorithm_is_refused(job_env):
    result = bash_job(job_env, ALGORITHM="foo")
    assert result.returncode == 1
    assert "error: ALGORITHM=foo: use tpe (the default), asha or random" in result.stderr


@pytest.mark.parametrize("prior, reason", [
    ("loguniform(1e-5, 1.0", "Please provide a valid form for prior: 'distribution(*args, **kwargs)'"),
    ("logunifrom(1e-5, 1.0)", "'logunifrom' does not correspond to a supported distribution"),
])
def test_malformed_prior_is_refused_before_the_hunt(job_env, tmp_path, prior, reason):
    # A student's edit of job.sh's priors; the edited copy runs from this folder, as sbatch runs its copy.
    script = (REPO_ROOT / "job.sh").read_text()
    assert script.count("--learning-rate~'loguniform(1e-5, 1e-2)'") == 1
    (tmp_path / "job.sh").write_text(script.replace("'loguniform(1e-5, 1e-2)'", f"'{prior}'"))
    result = subprocess.run(["bash", tmp_path / "job.sh", "--epochs", "1"], env=job_environment(job_env),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert f"error: the prior --learning-rate~'{prior}' is not valid: {reason}; correct it in job.sh's `priors`" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path(database(job_env, dry_run=True)).exists()  # No trial, no experiment.


@pytest.fixture(params=["a file", "a read-only folder"])
def unwritable_scratch(request, tmp_path):
    """A $SCRATCH that job.sh cannot write in (read-only even for root: immutable)."""
    scratch = tmp_path / "scratch"
    if request.param == "a file":
        scratch.write_text("")
        yield scratch
        return
    scratch.mkdir()
    scratch.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", scratch], capture_output=True).returncode == 0
    try:
        if os.access(scratch, os.W_OK) and not immutable:
            pytest.skip("cannot make a folder read-only here (root, and no chattr +i)")
        yield scratch
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", scratch], check=True)
        scratch.chmod(0o755)


def test_scratch_that_cannot_be_written_is_refused(job_env, unwritable_scratch):
    result = bash_job({**job_env, "SCRATCH": unwritable_scratch})
    assert result.returncode == 1
    assert re.search(rf"^error: cannot write in {unwritable_scratch}/orion-example-dry-run/orion-example \(.+\): "
                     rf"\$SCRATCH={unwritable_scratch} must be a folder of yours that every node can write to; "
                     r"export another, then submit again$", result.stderr, re.MULTILINE), result.stderr


"""job.sh: on a real single-node Slurm cluster (see tests/slurm/cluster.sh), and without Slurm."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from orion.client import get_experiment

import orion_tools
from conftest import (REPO_ROOT, database, job_environment, make_job_env, read_metrics, read_trials,
                      readme_commands, sbatch_wait, trials_dir)

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
    assert [log.count("Epoch 0: Val loss") for log in logs] == [1, 1, 1]

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
    job_env = make_job_env(tmp_path, images=100)
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, *args, "--epochs", "1", "--batch-size", "32",
                               ORION_MAX_TRIALS=5)
    assert code == 0, output
    trials = read_trials(database(job_env), "orion-example")
    assert [t["status"] for t in trials] == ["completed"] * 5  # Exactly the budget: no overshoot.
    # Five trials ran at the same time: each of them started before any of them ended.
    first_five = sorted(trials, key=lambda t: t["start_time"])[:5]
    assert max(t["start_time"] for t in first_five) < min(t["end_time"] for t in first_five)


@pytest.fixture(scope="module")
def asha_search(slurm_env, tmp_path_factory):
    """An ASHA search of 8 trials by two workers (--epochs is the fidelity: rungs of 2, 4, 10).

    Returns Oríon's trials and, by trial id, the records of its metrics.jsonl.
    """
    tmp_path = tmp_path_factory.mktemp("asha")
    job_env = make_job_env(tmp_path, images=100)
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, "--array=1-2", "job.sh", "--batch-size", "32",
                               ALGORITHM="asha", ORION_MAX_TRIALS=8)
    assert code == 0, output
    trials = get_experiment("orion-example", storage=orion_tools.storage(database(job_env))).fetch_trials()
    return trials, {t.id: read_metrics(trials_dir(job_env) / t.id) for t in trials}, trials_dir(job_env)


def test_asha_runs_its_budget(asha_search):
    trials, _, _ = asha_search
    assert [t.status for t in trials] == ["completed"] * 8


def test_asha_promotions_resume_from_the_lower_rung(asha_search):
    trials, _, folder = asha_search
    promoted = [t for t in trials if t.parent is not None]
    assert promoted, "ASHA promoted no trial"
    for trial in promoted:
        parent = next(t for t in trials if t.id == trial.parent)
        resumed = f"Resuming training at epoch {parent.params['/epochs']}"
        assert resumed in (folder / trial.id / "train.log").read_text()


def test_asha_promotes_only_finished_trials(asha_search):
    # Oríon's issue 395 reports ASHA promoting unfinished trials with several workers: a
    # promotion would then copy a folder whose trial is still training. Not seen here.
    trials, _, _ = asha_search
    by_id = {t.id: t for t in trials}
    unfinished = [t.id for t in trials if t.parent is not None and by_id[t.parent].end_time > t.submit_time]
    assert unfinished == []


def test_asha_trains_fewer_epochs_than_without_reuse(asha_search):
    trials, metrics, _ = asha_search
    # A promoted trial's folder starts as a copy of its parent's: the same records, once trained.
    trained = {record["end_time"] for records in metrics.values() for record in records}
    assert len(trained) < sum(t.params["/epochs"] for t in trials)


def test_asha_trains_no_epoch_of_a_configuration_twice(asha_search):
    trials, metrics, _ = asha_search
    runs_of_epoch = {}  # (configuration, epoch) -> when it was trained
    for trial in trials:
        configuration = tuple(value for name, value in sorted(trial.params.items()) if name != "/epochs")
        for record in metrics[trial.id]:
            runs_of_epoch.setdefault((configuration, record["epoch"]), set()).add(record["end_time"])
    assert [key for key, runs in runs_of_epoch.items() if len(runs) > 1] == []


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


def test_unset_scratch_is_refused(slurm_env, job_env, tmp_path):
    without_scratch = {k: v for k, v in slurm_env.items() if k != "SCRATCH"}
    code, output = sbatch_wait(without_scratch, {k: v for k, v in job_env.items() if k != "SCRATCH"}, tmp_path,
                               "job.sh", "--epochs", "1")
    assert code == 1, output
    assert "error: $SCRATCH is not set: export SCRATCH=" in output


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
    job_env = make_job_env(tmp_path, images=100)
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


def test_heartbeat_that_would_run_live_trials_twice_is_refused(job_env):
    result = bash_job(job_env, ORION_HEARTBEAT=10)
    assert result.returncode == 1
    assert "ORION_HEARTBEAT=10: use a whole number of seconds of at least 23" in result.stderr


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
    assert script.count("--learning-rate~'loguniform(1e-5, 1.0)'") == 1
    (tmp_path / "job.sh").write_text(script.replace("'loguniform(1e-5, 1.0)'", f"'{prior}'"))
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


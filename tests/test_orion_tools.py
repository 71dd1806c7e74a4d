"""orion_tools.py against a real PickledDB file (no Oríon mocked)."""

import datetime
import subprocess
import sys
import time

import pytest
from orion.client import build_experiment, get_experiment

import orion_tools
from conftest import REPO_ROOT, clean_env

JOB_ID = "42"
JOB_START = time.time()  # When "this run" of job 42 started: the trials below are older.
BEFORE_JOB_START = datetime.datetime.utcnow() - datetime.timedelta(minutes=5)  # Naive UTC, as Oríon's.


@pytest.fixture
def database(tmp_path):
    return str(tmp_path / "orion_db.pkl")


@pytest.fixture
def experiment(database):
    return build_experiment("exp", space={"x": "uniform(0, 1)"}, storage=orion_tools.storage(database))


def reserved_trial(experiment, trials_dir, log: bytes | None, heartbeat=BEFORE_JOB_START):
    """A trial left `reserved` with this heartbeat, and this train.log (None: no log)."""
    trial = experiment.insert(params={"x": 0.5})
    experiment.storage.set_trial_status(trial, status="reserved", heartbeat=heartbeat)
    if log is not None:
        (trials_dir / trial.id).mkdir(parents=True)
        (trials_dir / trial.id / "train.log").write_bytes(log)
    return trial


def log_of(*jobs) -> bytes:
    return b"".join(b"INFO Running in Slurm job %s on node1\nEpoch 0: Val loss\n" % j.encode() for j in jobs)


def reclaim(database, trials_dir, experiment="exp"):
    return orion_tools.main(["reclaim", "--database", database, "--experiment", experiment,
                             "--trials-dir", str(trials_dir), "--job-id", JOB_ID, "--since", str(JOB_START)])


def status(database, trial) -> str:
    return get_experiment("exp", storage=orion_tools.storage(database)).get_trial(uid=trial.id).status


def test_reclaim_marks_interrupted_a_trial_this_job_left_reserved(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, log_of("7", JOB_ID))
    reclaim(database, tmp_path)
    assert status(database, trial) == "interrupted"


def test_reclaim_leaves_a_trial_last_run_by_another_job(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, log_of(JOB_ID, "7"))
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_leaves_a_trial_reserved_since_this_job_started(database, experiment, tmp_path):
    # Another worker reserved it (heartbeat now) but its main.py has not logged its line yet.
    trial = reserved_trial(experiment, tmp_path, log_of(JOB_ID), heartbeat=datetime.datetime.utcnow())
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_leaves_a_trial_without_train_log(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, log=None)
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_reads_a_train_log_that_is_not_utf8(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, b"\xff\xfe cut mid-character \xc3\n" + log_of(JOB_ID))
    reclaim(database, tmp_path)
    assert status(database, trial) == "interrupted"


def test_mark_interrupted_is_false_for_a_trial_another_worker_changed(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, log_of(JOB_ID))
    [stale] = experiment.fetch_trials_by_status("reserved")
    experiment.storage.set_trial_status(trial, status="completed", was="reserved")  # Meanwhile.
    assert orion_tools.mark_interrupted(experiment, stale) is False


def test_command_line_reclaim_without_the_experiment_exits_0(database, tmp_path):
    # A requeued job that was killed while staging: no experiment yet. job.sh runs under set -e.
    result = subprocess.run(
        [sys.executable, "orion_tools.py", "reclaim", "--database", database, "--experiment", "exp",
         "--trials-dir", str(tmp_path), "--job-id", JOB_ID, "--since", str(JOB_START)],
        env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_reclaim_without_the_experiment_says_so(database, tmp_path, capsys):
    reclaim(database, tmp_path)
    assert "No experiment exp" in capsys.readouterr().out

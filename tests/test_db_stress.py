"""benchmarks/db_stress.py, reduced: 8 concurrent `orion_tools.py hunt` workers, 24 trials, on one
PickledDB file, for each of Oríon's two lock kinds; nothing lost, run twice, broken or timed out,
and every worker exits 0.

Runs the benchmark's own functions (one row each). The flock database lives in pytest's
temporary folder (ext4 here: Oríon's FileLock), the soft-lock one in /dev/shm (tmpfs:
SoftFileLock, as on NFS); a machine where either folder gets the other lock fails the test
instead of testing the wrong lock. No timing assertion.
"""

import shutil
import tempfile
from pathlib import Path

import filelock
import pytest

from conftest import REPO_ROOT, import_benchmark

SCRIPT = REPO_ROOT / "benchmarks" / "db_stress.py"
WORKERS = 8
TRIALS_PER_WORKER = 3  # A budget of 24.
SLEEP = 0.5  # Seconds per trial: short, so that the workers hit the database often; trials still overlap.
ROW_TIMEOUT = 300  # Workers still running then are killed (and the test fails), instead of hanging.


@pytest.fixture(scope="module")
def db_stress():
    return import_benchmark(SCRIPT)


def database_folder(kind: str, tmp_path_factory) -> Path:
    """A fresh folder where Oríon creates the lock `kind` ('flock' or 'soft') for a database."""
    if kind == "flock":
        return tmp_path_factory.mktemp("db-stress-flock")
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("no /dev/shm on this machine: nowhere to test Oríon's SoftFileLock (tmpfs)")
    return Path(tempfile.mkdtemp(prefix="db-stress-test-", dir=shm))


@pytest.fixture(scope="module", params=["flock", "soft"])
def row(request, db_stress, tmp_path_factory):
    """The figures of one row: WORKERS workers, WORKERS x TRIALS_PER_WORKER trials, lock `param`."""
    kind = request.param
    folder = database_folder(kind, tmp_path_factory)
    try:
        expected = (filelock.FileLock if kind == "flock" else filelock.SoftFileLock).__name__
        lock = db_stress.lock_class(folder / "orion_db.pkl")
        if lock != expected:
            pytest.fail(f"Oríon creates a {lock} for a database in {folder} "
                        f"({db_stress.filesystem_type(folder)}), not the {expected} this test is for")
        result = db_stress.run_row(folder / "row", WORKERS, TRIALS_PER_WORKER, SLEEP, ROW_TIMEOUT)
    finally:
        if kind == "soft":  # Keep the workers' output for a failure, out of /dev/shm.
            shutil.copytree(folder, tmp_path_factory.mktemp("db-stress-soft-kept"), dirs_exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{kind}: {WORKERS} workers, {result['completed']}/{result['budget']} trials in "
          f"{result['wall_seconds']:.1f} s, wait p50 {result['wait_p50']:.2f} s")
    return result


def evidence(row) -> str:
    keys = ["lock", "statuses", "runs", "run_twice_ids", "exit_codes", "tracebacks", "database_timeout_mentions",
            "algorithm_lock_timeouts", "folder"]
    return ", ".join(f"{key}={row[key]}" for key in keys)


def test_every_trial_of_the_budget_completes(row):
    assert row["completed"] == row["budget"] == WORKERS * TRIALS_PER_WORKER, evidence(row)


def test_no_trial_is_lost(row):
    assert row["lost"] == 0, evidence(row)


def test_no_trial_runs_twice(row):
    assert row["run_twice"] == 0, evidence(row)


def test_no_trial_breaks(row):
    assert row["broken"] == 0, evidence(row)


def test_no_lock_times_out(row):
    assert row["lock_timeouts"] == 0, evidence(row)


def test_no_algorithm_lock_times_out(row):
    """Oríon's lock on the experiment's algorithm, taken after every trial: a worker that waits
    60 s for it dies (benchmarks/db_stress.py, 50 workers)."""
    assert row["algorithm_lock_timeouts"] == 0, evidence(row)


def test_every_worker_exits_0(row):
    assert row["exit_codes"] == [0], evidence(row)


def test_every_completed_trial_has_its_run_recorded(row):
    """Else `run twice` above could be 0 for want of records (the stand-in's --record)."""
    assert row["completed_without_run"] == 0, evidence(row)

"""benchmarks/db_stress.py, reduced: 8 concurrent `python -m orion_tools hunt` workers, 24 trials, TPE
as job.sh configures it, on one PickledDB file, for each of Oríon's two lock kinds, one worker
SIGSTOPped for a few seconds (the database lock's holder, if one is seen); nothing lost, run
twice, rolled back, unreadable, broken or timed out, and every worker exits 0. (The benchmark's
own run: 3-minute trials, 10-100 workers, two 60-s stalls per row; RESULTS.md.)

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
STALL = 5  # Seconds: well within the lease's half (orion_tools.DATABASE_LOCK_LEASE): the worker goes on.
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
        result = db_stress.run_row(folder / "row", WORKERS, TRIALS_PER_WORKER, SLEEP, ROW_TIMEOUT,
                                   algorithm="tpe", stalls=1, stall_seconds=STALL)
    finally:
        if kind == "soft":  # Keep the workers' output for a failure, out of /dev/shm.
            shutil.copytree(folder, tmp_path_factory.mktemp("db-stress-soft-kept"), dirs_exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{kind}: {WORKERS} workers, {result['completed']}/{result['budget']} trials in "
          f"{result['wall_seconds']:.1f} s, wait p50 {result['wait_p50']:.2f} s")
    return result


def evidence(row) -> str:
    keys = ["lock", "statuses", "runs", "run_twice_ids", "exit_codes", "tracebacks", "database_timeout_mentions",
            "algorithm_lock_timeouts", "stalls", "rolled_back", "database_unreadable", "database_reads",
            "worker_errors", "folder"]
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


def test_the_stall_happened(row):
    assert row["stalls_done"] == 1, evidence(row)


def test_no_completed_trial_is_rolled_back(row):
    assert row["database_reads"] > 0 and row["rolled_back"] == 0, evidence(row)


def test_the_database_file_is_always_readable(row):
    assert row["database_unreadable"] == 0, evidence(row)


def test_every_hold_of_both_locks_is_traced(row):
    """ORION_TOOLS_LOCK_TRACE: the benchmark's lock holds (TPE's algorithm lock: issue 18, finding 8).
    At least one algorithm-lock hold per trial: its result shown to TPE."""
    assert row["database_lock_holds"] > row["budget"], evidence(row)
    assert row["algorithm_lock_holds"] >= row["budget"], evidence(row)

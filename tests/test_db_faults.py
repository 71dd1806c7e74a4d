"""The cluster's faults around Oríon's database, with real `orion_tools.py hunt` workers.

A worker SIGKILLed while it holds the database lock (flock, and a soft lock from this host and
from another host), a holder of the lock stalled (SIGSTOP) past the lease, a database that stays
locked while a trial runs, and a trial that the cluster kills: the search carries on, nothing is
rolled back, no trial is run twice, none is counted as broken.
"""

import collections
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import psutil
import pytest
from orion.client import get_experiment
from orion.core.io.database.pickleddb import _create_lock
from orion.core.utils.exceptions import NoConfigurationError

import orion_tools
from conftest import REPO_ROOT, STANDIN_TRIAL, clean_env, read_trials, standin_hunt_command

OBJECTIVE = "Objective (1 - validation accuracy)"  # The stand-in's line when a run ends.
# orion_tools' soft-lock lease (ORION_TOOLS_LOCK_LEASE) in these tests, for every process on
# one database: 3 s, not 90 s.
LEASE = 3


def start_worker(folder: Path, config: str, *trial_args, database: Path | None = None,
                 log_name: str = "worker.log", **env) -> subprocess.Popen:
    """One `orion_tools.py hunt` worker of experiment "faults" running the stand-in trial, as job.sh runs it."""
    (folder / "orion-config.yml").write_text(config)
    env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=database or folder / "orion_db.pkl", **env)
    return subprocess.Popen(
        standin_hunt_command("faults", folder / "orion-config.yml", folder / "trials", *trial_args),
        cwd=REPO_ROOT, env=env, stdout=open(folder / log_name, "w"), stderr=subprocess.STDOUT,
    )


def budget_config(budget: int, extra: str = "") -> str:
    return (f"experiment:\n  algorithm:\n    random:\n      seed: 1\n  max_trials: {budget}\n"
            f"worker:\n  executor: singleexecutor\n  idle_timeout: 600\n{extra}")


def trials(database: Path) -> list:
    return get_experiment("faults", storage=orion_tools.storage(str(database))).fetch_trials()


def wait_for_status(database: Path, status: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if database.exists() and any(t.status == status for t in trials(database)):
                return
        except NoConfigurationError:  # The worker has not created the experiment yet.
            pass
        time.sleep(0.5)
    raise AssertionError(f"no trial became {status} within {timeout} s")


# --- A worker SIGKILLed while holding the database lock ---------------------------------------

HOLD_THE_LOCK = """
import sys, time
from orion.core.io.database.pickleddb import _create_lock
lock = _create_lock(sys.argv[1])  # Oríon's own choice of lock for this file.
lock.acquire()
print("held", type(lock).__name__, flush=True)
time.sleep(600)
"""


def sigkill_while_holding_the_lock(database: Path, other_host: bool) -> None:
    """A process takes Oríon's lock on `database` (on another host name: in a UTS namespace), and is SIGKILLed."""
    command = [sys.executable, "-W", "ignore", "-c", HOLD_THE_LOCK, f"{database}.lock"]
    if other_host:
        command = ["unshare", "--uts", "sh", "-c", 'hostname other-node && exec "$@"', "sh", *command]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=clean_env())
    assert holder.stdout.readline().startswith("held")
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def soft_lock_dir(tmp_path) -> Path:
    """A folder where Oríon locks with a SoftFileLock: tmpfs (/dev/shm), as on NFS."""
    folder = Path("/dev/shm") / f"orion-faults-{tmp_path.name}"
    folder.mkdir()
    if not isinstance(_create_lock(str(folder / "x.lock")), filelock.SoftFileLock):
        pytest.fail("/dev/shm is not tmpfs here: the soft-lock tests need a folder where Oríon uses SoftFileLock")
    return folder


@pytest.fixture
def soft_dir(tmp_path):
    folder = soft_lock_dir(tmp_path)
    yield folder
    subprocess.run(["rm", "-rf", folder])


@pytest.mark.parametrize("lock", ["flock", "soft lock, this host", "soft lock, other host"])
def test_a_worker_killed_holding_the_lock_stops_no_one(tmp_path, request, lock):
    folder = tmp_path if lock == "flock" else request.getfixturevalue("soft_dir")
    database = folder / "orion_db.pkl"
    sigkill_while_holding_the_lock(database, other_host=lock.endswith("other host"))
    assert (folder / "orion_db.pkl.lock").exists() or lock == "flock"  # The marker is left behind.
    worker = start_worker(tmp_path, budget_config(2), database=database, ORION_TOOLS_LOCK_LEASE=LEASE)
    # Bounded: Oríon's DatabaseTimeout would end the worker at DATABASE_LOCK_TIMEOUT.
    assert worker.wait(timeout=orion_tools.DATABASE_LOCK_TIMEOUT + 120) == 0
    assert [t.status for t in trials(database)] == ["completed"] * 2


def test_filelock_alone_never_breaks_another_hosts_soft_lock(soft_dir):
    """Why orion_tools breaks a marker unchanged for a lease: without it, every worker waits for good."""
    sigkill_while_holding_the_lock(soft_dir / "orion_db.pkl", other_host=True)
    with pytest.raises(filelock.Timeout):
        filelock.SoftFileLock(soft_dir / "orion_db.pkl.lock").acquire(timeout=3)


# --- The database locked while a trial runs (Oríon's DatabaseTimeout in the heartbeat) --------

def test_a_database_locked_while_a_trial_runs_does_not_run_it_twice(tmp_path):
    # A lock wait gives up after 3 s. Oríon writes a running trial's heartbeat every 60 s
    # (hard-coded), and another worker takes it for lost once it is 5 x $ORION_HEARTBEAT = 65 s
    # old: a heartbeat missed at 60 s because of the lock makes it look lost at 65 s.
    config = budget_config(1, f"storage:\n  database:\n    type: pickleddb\n"
                              f"    host: {tmp_path / 'orion_db.pkl'}\n    timeout: 3\n")
    first = start_worker(tmp_path, config, "--sleep", "110", log_name="first.log", ORION_HEARTBEAT=13)
    wait_for_status(tmp_path / "orion_db.pkl", "reserved")
    # Timed from the reservation (its heartbeat), not from when this test saw it: on a busy
    # machine the test sees it seconds late, and the lock must cover the heartbeat due at 60 s.
    [trial] = trials(tmp_path / "orion_db.pkl")
    reserved_at = trial.heartbeat.replace(tzinfo=datetime.timezone.utc).timestamp()
    time.sleep(max(0.0, reserved_at + 50 - time.time()))
    with _create_lock(str(tmp_path / "orion_db.pkl.lock")):  # flock here: another worker holding it.
        time.sleep(max(0.0, reserved_at + 85 - time.time()))  # The heartbeat thread's waits time out.
    # A second worker, now that the heartbeat is 85 s old without the retry: the trial would look lost.
    second = start_worker(tmp_path, config, "--sleep", "110", log_name="second.log", ORION_HEARTBEAT=13)
    assert second.wait(timeout=300) == 0
    assert first.wait(timeout=300) == 0
    logs = (tmp_path / "first.log").read_text() + (tmp_path / "second.log").read_text()
    assert "heartbeat of trial" in logs  # The injected lock timeout did happen.
    assert logs.count(OBJECTIVE) == 1


# --- A trial killed by the cluster -------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_trial(tmp_path_factory):
    """A worker whose trial is SIGKILLed, as the kernel's out-of-memory killer does, then a next worker."""
    tmp_path = tmp_path_factory.mktemp("killed")
    worker = start_worker(tmp_path, budget_config(1), "--sleep", "15")
    wait_for_status(tmp_path / "orion_db.pkl", "reserved")
    trial_process = None
    deadline = time.time() + 60
    while trial_process is None and time.time() < deadline:
        trial_process = next((child for child in psutil.Process(worker.pid).children(recursive=True)
                              if str(STANDIN_TRIAL) in child.cmdline()), None)
        time.sleep(0.2)
    trial_process.send_signal(signal.SIGKILL)
    killed = {"exit": worker.wait(timeout=120), "statuses": [t.status for t in trials(tmp_path / "orion_db.pkl")],
              "log": (tmp_path / "worker.log").read_text()}
    next_worker = start_worker(tmp_path, budget_config(1), "--sleep", "15", log_name="next.log")
    next_exit = next_worker.wait(timeout=300)
    return killed, {"exit": next_exit, "statuses": [t.status for t in trials(tmp_path / "orion_db.pkl")]}


def test_a_killed_trial_stops_its_worker_with_130(killed_trial):
    killed, _ = killed_trial
    assert killed["exit"] == 130


def test_a_killed_trial_is_interrupted_not_broken(killed_trial):
    killed, _ = killed_trial
    assert killed["statuses"] == ["interrupted"]


def test_a_killed_trial_says_so(killed_trial):
    killed, _ = killed_trial
    assert "error: the trial was killed (SIGKILL" in killed["log"]


def test_a_killed_trial_is_run_again_by_the_next_worker(killed_trial):
    _, after = killed_trial
    assert after["statuses"] == ["completed"]


# --- A holder of the lock stalled (SIGSTOP) past the lease, then resumed (issue 18, finding 1) --

# Takes the database lock as the workers do, reads the database, stops itself (as Slurm's
# suspend, an NFS stall or swapping would), and once resumed leaves the block, which writes back
# the copy it read before the stall.
STALL_WHILE_HOLDING = """
import os, signal, sys
import orion_tools
orion_tools.install_database_lock()
from orion.core.io.database.pickleddb import PickledDB
print("ready", flush=True)
sys.stdin.readline()
try:
    with PickledDB(host=sys.argv[1], timeout=60).locked_database():
        print("loaded", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
except orion_tools.DatabaseLockError as error:
    print(f"error: {error}", flush=True)
    sys.exit(1)
print("wrote back", flush=True)
"""


def completed_ids(database: Path) -> list[str]:
    return sorted(t["id"] for t in read_trials(database) if t["status"] == "completed")


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("lock", ["soft lock", "flock"])
def test_a_lock_holder_stalled_past_the_lease_rolls_nothing_back(tmp_path, request, lock):
    folder = request.getfixturevalue("soft_dir") if lock == "soft lock" else tmp_path
    database, record = folder / "orion_db.pkl", tmp_path / "runs.jsonl"
    worker = start_worker(tmp_path, budget_config(6), "--sleep", "1", "--record", record,
                          database=database, ORION_TOOLS_LOCK_LEASE=LEASE)
    holder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", STALL_WHILE_HOLDING, str(database)],
                              cwd=REPO_ROOT, env=clean_env(ORION_TOOLS_LOCK_LEASE=LEASE), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    request.addfinalizer(lambda: holder.kill())  # Never left stopped.
    assert holder.stdout.readline() == "ready\n"
    wait_until(lambda: database.exists() and len(completed_ids(database)) >= 1, 120, "a first trial completed")
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "loaded\n"
    wait_until(lambda: psutil.Process(holder.pid).status() == psutil.STATUS_STOPPED, 10, "the holder stopped")
    before = completed_ids(database)
    if lock == "soft lock":  # The worker takes the lock over once the lease has passed, and goes on.
        wait_until(lambda: len(completed_ids(database)) >= len(before) + 2, 120, "two trials more, holder stalled")
    else:  # The kernel keeps a live holder's flock: the worker waits.
        time.sleep(2 * LEASE)
        assert completed_ids(database) == before
    holder.send_signal(signal.SIGCONT)
    output, _ = holder.communicate(timeout=60)
    assert worker.wait(timeout=300) == 0
    completed = completed_ids(database)  # Readable, whole.
    assert set(before) <= set(completed) and len(completed) == 6  # Nothing rolled back.
    runs = collections.Counter(json.loads(line)["trial"] for line in record.read_text().splitlines())
    assert sorted(runs.values()) == [1] * 6  # No trial ran twice.
    assert not list(folder.glob("*.tmp"))
    if lock == "soft lock":  # It found its lock taken over: it wrote nothing, and said so in one line.
        assert holder.returncode == 1
        assert output.startswith("error: ") and "took the lock over" in output and output.count("\n") == 1
    else:
        assert holder.returncode == 0 and output == "wrote back\n"

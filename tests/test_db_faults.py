"""The cluster's faults around Oríon's database, with real `python -m orion_tools hunt` workers.

A worker SIGKILLed while it holds the database lock (flock, and a soft lock from this host and
from another host), a holder of the lock stalled (SIGSTOP) past the lease, a database that stays
locked while a trial runs, and a trial that the cluster kills: the search carries on, nothing is
rolled back, no trial is run twice, none is counted as broken.
"""

import collections
import contextlib
import datetime
import json
import os
import pickle
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
    """One `python -m orion_tools hunt` worker of experiment "faults" running the stand-in trial, as job.sh runs it."""
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


# --- The heartbeat of a running trial (issue 18, finding 2) --------------------------------------
# Scaled down: ORION_HEARTBEAT=3, so a trial whose heartbeat is 15 s old counts as lost; the
# lock waits give up after 3 s; the soft-lock lease (which a heartbeat must outlast) is 3 s.
# Oríon 0.2.7 wrote the heartbeat every 60 s whatever ORION_HEARTBEAT said, and an error ended
# its thread.
HEARTBEAT = 3


def heartbeat_config(tmp_path) -> str:
    return budget_config(1, f"storage:\n  database:\n    type: pickleddb\n"
                            f"    host: {tmp_path / 'orion_db.pkl'}\n    timeout: 3\n")


def reserved_at(database: Path) -> float:
    """When the one trial was reserved (its first heartbeat), in seconds since the epoch."""
    wait_for_status(database, "reserved")
    [trial] = trials(database)
    return trial.heartbeat.replace(tzinfo=datetime.timezone.utc).timestamp()


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


@contextlib.contextmanager
def unreadable(database: Path):
    """The database file replaced by one that is no pickle (as a torn or foreign file), then put back."""
    good = database.read_bytes()
    (database.parent / "garbage").write_bytes(b"not a pickle")
    os.replace(database.parent / "garbage", database)
    try:
        yield
    finally:
        (database.parent / "good").write_bytes(good)
        os.replace(database.parent / "good", database)


@pytest.mark.parametrize("fault", ["database locked", "database unreadable"])
def test_a_late_heartbeat_does_not_make_a_live_trial_lost(tmp_path, fault):
    database, record = tmp_path / "orion_db.pkl", tmp_path / "runs.jsonl"
    first = start_worker(tmp_path, heartbeat_config(tmp_path), "--sleep", "22", "--record", record,
                         log_name="first.log", ORION_HEARTBEAT=HEARTBEAT, ORION_TOOLS_LOCK_LEASE=LEASE)
    start = reserved_at(database)
    sleep_until(start + 4)  # Timed from the reservation: the test may see it late on a busy machine.
    with _create_lock(str(tmp_path / "orion_db.pkl.lock")) if fault == "database locked" else unreadable(database):
        sleep_until(start + 10)  # Heartbeats due at 6 and 9 s fail (lock wait 3 s, or UnpicklingError).
    # A second worker, once the trial would look lost without a heartbeat since the reservation.
    sleep_until(start + 17)
    second = start_worker(tmp_path, heartbeat_config(tmp_path), "--sleep", "22", "--record", record,
                          log_name="second.log", ORION_HEARTBEAT=HEARTBEAT, ORION_TOOLS_LOCK_LEASE=LEASE)
    assert second.wait(timeout=300) == 0
    assert first.wait(timeout=300) == 0
    late = "cannot be used (the Oríon database" if fault == "database locked" else "be written (UnpicklingError"
    assert late in (tmp_path / "first.log").read_text()  # The fault did hit the heartbeat.
    assert len(record.read_text().splitlines()) == 1  # Run once.
    assert [t.status for t in trials(database)] == ["completed"]


def test_a_database_locked_past_5_heartbeats_stops_no_trial_and_runs_none_twice(tmp_path):
    """Issue 24, row 1 in its kernel-lock form: the database locked (a holder stalled, or dead on a
    soft lock until its lease runs out) for longer than 5 x ORION_HEARTBEAT while a trial runs. The
    heartbeat waits (the trial runs on); a worker that starts meanwhile does not take the trial for
    lost once the lock is free, since it never watched it stand still while the database was usable.
    Before: the running trial was stopped after 4 x ORION_HEARTBEAT, and its worker exited 1."""
    database, record = tmp_path / "orion_db.pkl", tmp_path / "runs.jsonl"
    first = start_worker(tmp_path, heartbeat_config(tmp_path), "--sleep", "30", "--record", record,
                         log_name="first.log", ORION_HEARTBEAT=HEARTBEAT, ORION_TOOLS_LOCK_LEASE=LEASE)
    start = reserved_at(database)
    sleep_until(start + 4)
    with _create_lock(str(tmp_path / "orion_db.pkl.lock")):
        second = start_worker(tmp_path, heartbeat_config(tmp_path), "--sleep", "1", "--record", record,
                              log_name="second.log", ORION_HEARTBEAT=HEARTBEAT, ORION_TOOLS_LOCK_LEASE=LEASE)
        sleep_until(start + 4 + 6 * HEARTBEAT)
        assert first.poll() is None  # Still running its trial.
    assert first.wait(timeout=300) == 0
    assert second.wait(timeout=300) == 0
    assert "cannot be used" in (tmp_path / "first.log").read_text()  # The heartbeat did wait.
    assert len(record.read_text().splitlines()) == 1  # Run once, to its end.
    assert [t.status for t in trials(database)] == ["completed"]


def test_workers_of_one_search_with_another_heartbeat_are_refused(tmp_path):
    """Issue 24, row 5: each worker judged a trial lost after 5 x its own ORION_HEARTBEAT: a job with
    a short one took a live trial of a job with a long one for lost. The first worker of an
    experiment records its timings in the database, in the update that reads them: of two workers
    started at the same moment with different heartbeats, exactly one runs, and the other is
    refused in one line; so is any later one."""
    database, record = tmp_path / "orion_db.pkl", tmp_path / "runs.jsonl"
    workers = {beat: start_worker(tmp_path, heartbeat_config(tmp_path), "--sleep", "8", "--record", record,
                                  log_name=f"heartbeat-{beat}.log", ORION_HEARTBEAT=beat, ORION_TOOLS_LOCK_LEASE=LEASE)
               for beat in (12, HEARTBEAT)}
    exits = {beat: worker.wait(timeout=120) for beat, worker in workers.items()}
    assert sorted(exits.values()) == [0, 1], exits
    [refused] = [beat for beat, code in exits.items() if code == 1]
    [kept] = [beat for beat in exits if beat != refused]
    assert (tmp_path / f"heartbeat-{refused}.log").read_text().splitlines()[-1] == (
        f"error: experiment faults's workers use other timings (ORION_HEARTBEAT={kept} there, {refused} here; set by "
        "its first worker): every worker of one search must use the same, or live trials are taken for lost; use "
        "theirs, or a new experiment (ORION_EXPERIMENT=<a new name>)")
    assert len(record.read_text().splitlines()) == 1
    later = start_worker(tmp_path, budget_config(2), "--sleep", "1", log_name="later.log",
                         ORION_HEARTBEAT=refused, ORION_TOOLS_LOCK_LEASE=LEASE)
    assert later.wait(timeout=120) == 1


# --- A worker killed while it holds the algorithm lock (issue 18, finding 3) ---------------------

HOLD_THE_ALGORITHM_LOCK = """
import sys, time
import orion_tools
from orion.client import get_experiment
if sys.argv[2:] == ["--when-told"]:
    print("ready", flush=True)
    sys.stdin.readline()
experiment = get_experiment("faults", mode="w", storage=orion_tools.storage(sys.argv[1]))
with experiment._experiment._storage.acquire_algorithm_lock(uid=experiment.id, timeout=10):  # Oríon's own.
    print("held", flush=True)
    time.sleep(600)
"""


def test_an_algorithm_lock_left_by_a_killed_worker_is_taken_over(tmp_path):
    database = tmp_path / "orion_db.pkl"
    assert start_worker(tmp_path, budget_config(1), log_name="first.log").wait(timeout=300) == 0
    holder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", HOLD_THE_ALGORITHM_LOCK, str(database)],
                              cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    [algo] = read_algo(database)
    assert algo["locked"] == 1  # Left behind: Oríon never expires it.
    # ALGORITHM_LOCK_STALE 3 s instead of 120 s; without it, the worker would wait 600 s.
    worker = start_worker(tmp_path, budget_config(3), ORION_TOOLS_ALGORITHM_LOCK_STALE=3)
    assert worker.wait(timeout=120) == 0
    assert [t.status for t in trials(database)] == ["completed"] * 3
    log = (tmp_path / "worker.log").read_text()
    assert "warning: took over the algorithm lock of experiment faults" in log
    assert read_algo(database)[0]["locked"] == 0



def test_a_sigterm_while_waiting_for_the_algorithm_lock_is_not_held_back(tmp_path):
    """Oríon holds back SIGTERM while it shows a result to the algorithm, lock wait included (up to
    600 s): past job.sh's 120 s before the time limit. Now the worker stops at once, and the next
    worker that suggests trials shows the result to the algorithm."""
    database = tmp_path / "orion_db.pkl"
    worker = start_worker(tmp_path, budget_config(2), "--sleep", "6", log_name="first.log")
    holder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", HOLD_THE_ALGORITHM_LOCK, str(database),
                               "--when-told"], cwd=REPO_ROOT, env=clean_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "ready\n"
    wait_for_status(database, "reserved")
    [unseen] = [t["id"] for t in read_trials(database) if t["status"] == "reserved"]
    holder.stdin.write("go\n")  # While the trial runs: the worker needs the lock only once it ends.
    holder.stdin.flush()
    assert holder.stdout.readline() == "held\n"
    holder.kill()
    holder.wait()
    # Completed, then `observe`: waiting for the lock (120 s before it counts as stale).
    wait_until(lambda: unseen in completed_ids(database), 60, "the trial completed")
    time.sleep(1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 130
    assert "warning: signalled while waiting for the algorithm lock" in (tmp_path / "first.log").read_text()
    # The trial whose result the first worker could not show: `unseen`, or, on a loaded machine where the
    # holder took the lock only after `unseen` was observed, the next one, completed last.
    [missed] = [t["id"] for t in read_trials(database) if t["status"] == "completed"
                and t["end_time"] == max(u["end_time"] for u in read_trials(database) if u["status"] == "completed")]
    second = start_worker(tmp_path, budget_config(3), log_name="second.log", ORION_TOOLS_ALGORITHM_LOCK_STALE=3)
    assert second.wait(timeout=120) == 0
    assert f"The algorithm sees now the result of trial(s) {missed}, " in (tmp_path / "second.log").read_text()
    assert [t["status"] for t in read_trials(database)] == ["completed"] * 3


def read_algo(database: Path) -> list[dict]:
    with open(database, "rb") as file:
        return pickle.load(file)._db["algo"].find({})


# --- The end of a search (issue 18, finding 4) ---------------------------------------------------

def trial_process_of(worker: subprocess.Popen):
    """The stand-in trial that the worker runs (None: none yet)."""
    for child in psutil.Process(worker.pid).children(recursive=True):
        try:
            if str(STANDIN_TRIAL) in child.cmdline():
                return child
        except psutil.Error:  # A short-lived child of the worker (Oríon runs git) that just ended.
            pass
    return None


def test_a_worker_killed_with_its_trial_at_the_end_leaves_no_trial_behind(tmp_path):
    """Budget 2, 2 workers, one SIGKILLed with its trial: the other stays, and resumes that trial
    once it counts as lost (ORION_HEARTBEAT=2: after 10 s), instead of leaving it reserved."""
    database, record = tmp_path / "orion_db.pkl", tmp_path / "runs.jsonl"
    workers = [start_worker(tmp_path, budget_config(2), "--sleep", "6", "--record", record,
                            log_name=f"worker{i}.log", ORION_HEARTBEAT=2,
                            ORION_TOOLS_LOCK_LEASE=LEASE) for i in range(2)]
    wait_until(lambda: all(trial_process_of(w) for w in workers), 120, "both workers run a trial")
    killed, survivor = workers
    trial_process = trial_process_of(killed)
    killed.kill()
    trial_process.kill()
    assert survivor.wait(timeout=120) == 0
    assert [t.status for t in trials(database)] == ["completed"] * 2
    runs = collections.Counter(json.loads(line)["trial"] for line in record.read_text().splitlines())
    assert sorted(runs.values()) == [1, 1]  # The killed run never finished; its trial ran once more.


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

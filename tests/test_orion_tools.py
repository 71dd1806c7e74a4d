"""orion_tools against a real PickledDB file (no Oríon mocked)."""

import datetime
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
from orion.client import build_experiment, get_experiment
from orion.core.utils.exceptions import NoConfigurationError

import orion_tools
from conftest import REPO_ROOT, clean_env, orion_tools_listing_heavy_imports, standin_hunt_command

JOB_ID = "42"
JOB_START = time.time()  # When "this run" of job 42 started: the trials below are older.
BEFORE_JOB_START = datetime.datetime.utcnow() - datetime.timedelta(minutes=5)  # Naive UTC, as Oríon's.


@pytest.fixture
def database(tmp_path):
    return str(tmp_path / "orion_db.pkl")


@pytest.fixture
def experiment(database):
    return build_experiment("exp", space={"x": "uniform(0, 1)"}, storage=orion_tools.storage(database))


def reserve(experiment, heartbeat=BEFORE_JOB_START):
    """Reserves the experiment's next trial, as a worker does; its heartbeat then set to `heartbeat`."""
    trial = experiment.storage.reserve_trial(experiment._experiment)
    experiment.storage.set_trial_status(trial, status="reserved", heartbeat=heartbeat)
    return trial


def write_worker_file(trials_dir, trial, job_id: str, content: str | None = None) -> None:
    """The worker.json that `python -m orion_tools hunt` writes when it starts running the trial."""
    (trials_dir / trial.id).mkdir(parents=True, exist_ok=True)
    (trials_dir / trial.id / orion_tools.WORKER_FILE).write_text(content if content is not None else json.dumps(
        {"slurm_job": job_id, "host": "node1", "pid": 42, "reserved_at": trial.start_time.isoformat()}))


def reserved_trial(experiment, trials_dir, job_id: str | None, heartbeat=BEFORE_JOB_START):
    """A trial left `reserved` with this heartbeat by a worker of job `job_id` (None: no worker.json)."""
    experiment.insert(params={"x": 0.5})
    trial = reserve(experiment, heartbeat)
    if job_id is not None:
        write_worker_file(trials_dir, trial, job_id)
    return trial


def reclaim(database, trials_dir, experiment="exp"):
    return orion_tools.main(["reclaim", "--database", database, "--experiment", experiment,
                             "--trials-dir", str(trials_dir), "--job-id", JOB_ID, "--since", str(JOB_START)])


def status(database, trial) -> str:
    return get_experiment("exp", storage=orion_tools.storage(database)).get_trial(uid=trial.id).status


def test_reclaim_marks_interrupted_a_trial_this_job_left_reserved(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, JOB_ID)
    reclaim(database, tmp_path)
    assert status(database, trial) == "interrupted"


def test_reclaim_leaves_a_trial_last_run_by_another_job(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, "7")
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_leaves_a_trial_reserved_since_this_job_started(database, experiment, tmp_path):
    # Another worker reserved it (heartbeat now) but has not written its worker.json yet.
    trial = reserved_trial(experiment, tmp_path, JOB_ID, heartbeat=datetime.datetime.utcnow())
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_leaves_a_trial_another_job_reserved_again_before_writing_its_worker_file(
        database, experiment, tmp_path):
    # This job ran the trial and was killed; the trial was taken back and became `interrupted`;
    # a worker of another job reserved it before this job restarted (its heartbeat is older than
    # this run), and has not yet written its own worker.json: ours is still there.
    experiment.insert(params={"x": 0.5})
    earlier = reserve(experiment)
    write_worker_file(tmp_path, earlier, JOB_ID)
    experiment.storage.set_trial_status(earlier, status="interrupted", was="reserved")
    time.sleep(0.01)  # Another reservation, another start_time.
    trial = reserve(experiment)
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_leaves_a_trial_without_worker_file(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, job_id=None)
    reclaim(database, tmp_path)
    assert status(database, trial) == "reserved"


def test_reclaim_reads_past_a_worker_file_cut_short(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, job_id=None)
    write_worker_file(tmp_path, trial, JOB_ID, content='{"slurm_job": "42", "ho')
    assert reclaim(database, tmp_path) == 0
    assert status(database, trial) == "reserved"


def test_mark_interrupted_is_false_for_a_trial_another_worker_changed(database, experiment, tmp_path):
    trial = reserved_trial(experiment, tmp_path, JOB_ID)
    [stale] = experiment.fetch_trials_by_status("reserved")
    experiment.storage.set_trial_status(trial, status="completed", was="reserved")  # Meanwhile.
    assert orion_tools.mark_interrupted(experiment, stale) is False


def test_command_line_reclaim_without_the_experiment_exits_0(database, tmp_path):
    # A requeued job that was killed while staging: no experiment yet. job.sh runs under set -e.
    result = subprocess.run(
        [sys.executable, "-m", "orion_tools", "reclaim", "--database", database, "--experiment", "exp",
         "--trials-dir", str(tmp_path), "--job-id", JOB_ID, "--since", str(JOB_START)],
        env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_reclaim_without_the_experiment_says_so(database, tmp_path, capsys):
    reclaim(database, tmp_path)
    assert "No experiment exp" in capsys.readouterr().out


# --- hunt: an exact budget -------------------------------------------------------------------



def start_workers(tmp_path, n_workers: int, budget: int, trial_seconds: float) -> list:
    """`n_workers` concurrent `python -m orion_tools hunt` workers on one PickledDB, running the stand-in trial."""
    config = tmp_path / "orion-config.yml"
    config.write_text(
        f"experiment:\n  algorithm:\n    random:\n      seed: 1\n  max_trials: {budget}\n"
        # Oríon's LazyWorkers wait, far beyond this test: a spare worker must not need it.
        "worker:\n  executor: singleexecutor\n  idle_timeout: 600\n"
    )
    # A spare worker leaves once it has seen each running trial's heartbeat move: every 4 s here.
    env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=tmp_path / "orion_db.pkl", SLURM_JOB_ID="1234",
                    ORION_HEARTBEAT="4")
    command = standin_hunt_command("budget", config, tmp_path / "trials", "--sleep", trial_seconds,
                                   worker_records=tmp_path / "records")
    # Each worker's output in a file of tmp_path, to read when a test fails.
    return [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=open(tmp_path / f"worker-{i}.log", "w"),
                             stderr=subprocess.STDOUT) for i in range(n_workers)]


def wait_for_workers(workers) -> list[tuple[int, float]]:
    """Each worker's (exit code, wall time when it was seen to exit)."""
    ended = {}
    deadline = time.time() + 500
    while len(ended) < len(workers) and time.time() < deadline:
        for i, worker in enumerate(workers):
            if i not in ended and worker.poll() is not None:
                ended[i] = (worker.returncode, time.time())
        time.sleep(0.2)
    return [ended.get(i, (None, None)) for i in range(len(workers))]


def trials_of(tmp_path) -> list:
    return get_experiment("budget", storage=orion_tools.storage(str(tmp_path / "orion_db.pkl"))).fetch_trials()


@pytest.fixture(scope="module")
def more_workers_than_budget(tmp_path_factory):
    """5 workers, a budget of 3 trials of 20 s each."""
    tmp_path = tmp_path_factory.mktemp("budget-3")
    ended = wait_for_workers(start_workers(tmp_path, n_workers=5, budget=3, trial_seconds=20))
    return ended, trials_of(tmp_path), tmp_path


def test_more_workers_than_budget_run_exactly_the_budget(more_workers_than_budget):
    _, trials, _ = more_workers_than_budget
    assert [t.status for t in trials] == ["completed"] * 3


def test_every_worker_exits_0(more_workers_than_budget):
    ended, _, _ = more_workers_than_budget
    assert [code for code, _ in ended] == [0] * 5


def test_spare_workers_exit_before_the_trials_end(more_workers_than_budget):
    ended, trials, _ = more_workers_than_budget
    first_trial_end = min(t.end_time for t in trials).replace(tzinfo=datetime.timezone.utc).timestamp()
    exit_times = sorted(seen for _, seen in ended)
    assert exit_times[1] < first_trial_end  # Not Oríon's LazyWorkers wait (here 600 s).


def test_each_worker_records_the_trials_it_ran(more_workers_than_budget):
    ended, trials, tmp_path = more_workers_than_budget
    records = orion_tools.read_worker_records(tmp_path / "records")
    assert sorted((r["trial"], r["outcome"]) for r in records) == sorted((t.id, "completed") for t in trials)


def test_a_trials_folder_names_its_worker_and_reservation(more_workers_than_budget):
    _, trials, tmp_path = more_workers_than_budget
    for trial in trials:
        worker = orion_tools.worker_of(tmp_path / "trials" / trial.id)
        assert (worker["slurm_job"], worker["reserved_at"]) == ("1234", trial.start_time.isoformat())


def test_job_verdict_counts_the_trials_the_job_ran(more_workers_than_budget, capsys):
    _, _, tmp_path = more_workers_than_budget
    code = orion_tools.main(["job-verdict", "--worker-records", str(tmp_path / "records"), "--hunt-status", "0",
                             "--experiment", "budget", "--database", str(tmp_path / "orion_db.pkl")])
    assert code == 0
    assert capsys.readouterr().out == "This job ran 3 trial(s) of experiment budget: 3 completed\n"


def test_job_verdict_of_an_experiment_past_max_broken_says_how_to_recover(tmp_path, capsys):
    database = str(tmp_path / "orion_db.pkl")
    experiment = build_experiment("exp", space={"x": "uniform(0, 1)"}, max_broken=1,
                                  storage=orion_tools.storage(database))
    trial = experiment.insert(params={"x": 0.5})
    experiment.storage.set_trial_status(trial, status="broken")
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "node1-42.jsonl").write_text(json.dumps({"trial": trial.id, "outcome": "broken"}) + "\n")
    code = orion_tools.main(["job-verdict", "--worker-records", str(tmp_path / "records"), "--hunt-status", "0",
                             "--experiment", "exp", "--database", database])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: experiment exp has too many broken trials (1, max_broken 1) and runs nothing more" in err
    assert f"ORION_DB_ADDRESS={database} uv run orion db rm exp --status broken --force" in err


def test_fewer_workers_than_budget_run_exactly_the_budget(tmp_path):
    wait_for_workers(start_workers(tmp_path, n_workers=2, budget=7, trial_seconds=0))
    assert [t.status for t in trials_of(tmp_path)] == ["completed"] * 7


def test_a_worker_never_imports_torch(tmp_path):
    """Oríon's own CLI imports torch in every worker (3.8 s and ~400 MiB each, for `orion serve`):
    `python -m orion_tools hunt` builds only hunt's parser. Seen from outside: torch's libraries are
    never mapped into the worker's memory, while its trial runs (the stand-in sleeps 4 s)."""
    [worker] = start_workers(tmp_path, n_workers=1, budget=1, trial_seconds=4)
    maps = []
    while worker.poll() is None:
        try:
            maps.append(open(f"/proc/{worker.pid}/maps").read())
        except OSError:  # Gone between poll() and open().
            break
        time.sleep(0.2)
    assert worker.returncode == 0
    assert [t.status for t in trials_of(tmp_path)] == ["completed"]
    assert len(maps) > 10  # Read through the trial's 4 s, after the worker set up the hunt.
    assert not [m for m in maps if "libtorch" in m]


# --- ASHA with broken trials, LazyWorkers (issue 18, finding 5) ---------------------------------------------

ASHA_CONFIG = """experiment:
  algorithm:
    asha:
      seed: 1
      num_rungs: 3
      num_brackets: 1
  max_trials: 8
  max_broken: 10
worker:
  executor: singleexecutor
  idle_timeout: 10
"""


def test_asha_with_broken_trials_reaches_its_budget(tmp_path):
    """Trials above a learning rate of 0.01 break. ASHA kept them in their rung with no objective: the
    rung never filled, nothing more was suggested, every worker idled into LazyWorkers (which job.sh
    took for success) at 3 of 8 trials. Now ASHA sees them as the worst results."""
    (tmp_path / "orion-config.yml").write_text(ASHA_CONFIG)
    command = [*standin_hunt_command("asha", tmp_path / "orion-config.yml", tmp_path / "trials", "--sleep", 1,
                                     "--break-above", 0.01), "--epochs~fidelity(1, 4, base=2)"]
    env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=tmp_path / "orion_db.pkl")
    workers = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    trials = get_experiment("asha", storage=orion_tools.storage(str(tmp_path / "orion_db.pkl"))).fetch_trials()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert sum(t.status == "completed" for t in trials) == 8
    assert any(t.status == "broken" for t in trials)  # What this test is about.
    assert max(t.params["/epochs"] for t in trials if t.status == "completed") == 4  # Promoted to the top rung.


@pytest.mark.parametrize("other_trial", ["broken", "reserved by a live worker"])
def test_an_idle_worker_fails_only_when_the_search_is_stuck(experiment, capsys, other_trial):
    """After Oríon's LazyWorkers (idle for idle_timeout): exit 0 only if the trials left run elsewhere."""
    experiment.insert(params={"x": 0.5}, results=[{"name": "objective", "type": "objective", "value": 0.3}])
    trial = experiment.insert(params={"x": 0.25})
    if other_trial == "broken":
        experiment.storage.set_trial_status(trial, status="broken")
    else:
        experiment.storage.set_trial_status(trial, status="reserved")
    experiment._experiment.max_trials = 3
    orion_tools.EXPERIMENT[:] = [experiment._experiment]
    code = orion_tools.idle_verdict()
    out, err = capsys.readouterr()
    if other_trial == "broken":
        assert code == 1
        assert err == ("error: search exp stopped at 1 of 3 completed trials, no trial to run for idle_timeout: random "
                       "suggests no more trials while 1 trial(s) are broken (ASHA and Hyperband wait for a broken "
                       "trial's rung): fix their cause (their train.log), then run a new experiment "
                       "(ORION_EXPERIMENT=<new name>)\n")
    else:
        assert code == 0
        assert out == ("No trial left for this worker; 1 trial(s) still run in other workers, which finish the "
                       "search.\n")


# --- check-database: an emptied database is refused, a readable one backed up ----------------


def check_database(database, *experiment) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "orion_tools", "check-database", "--database",
                           str(database), *experiment], cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=120)


def test_a_readable_database_is_backed_up(database, experiment):
    assert check_database(database).returncode == 0
    assert open(f"{database}.bak", "rb").read() == open(database, "rb").read()


def test_check_database_imports_no_orion_client(database, experiment):
    """Every job starts with it: it reads the file, and needs none of Oríon's client (1.7 s of CPU)."""
    experiment.insert(params={"x": 0.5}, results=[{"name": "objective", "type": "objective", "value": 0.1}])
    result, heavy = orion_tools_listing_heavy_imports("check-database", "--database", database, "--experiment", "exp")
    assert result.returncode == 0, result.stderr
    assert heavy == "[]"
    assert open(f"{database}.bak", "rb").read() == open(database, "rb").read()


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_database_is_refused_with_the_way_back(database, experiment, damage):
    check_database(database)  # The backup a job made earlier.
    content = open(database, "rb").read()
    open(database, "wb").write(b"" if damage == "empty" else content[: len(content) // 2])
    result = check_database(database)
    assert result.returncode == 1
    assert result.stderr.endswith(f"restore the last good copy: cp {database}.bak {database}\n")


def test_a_damaged_database_keeps_the_last_good_backup(database, experiment):
    check_database(database)
    good = open(f"{database}.bak", "rb").read()
    open(database, "wb").write(b"")
    check_database(database)
    assert open(f"{database}.bak", "rb").read() == good


@pytest.fixture
def emptied_then_opened(database, experiment):
    """A search with a completed trial, backed up; then the file emptied and opened by Oríon (as
    `orion info` or `reclaim` would), which writes it back as a valid, empty database."""
    experiment.insert(params={"x": 0.5}, results=[{"name": "objective", "type": "objective", "value": 0.3}])
    check_database(database, "--experiment", "exp")
    open(database, "wb").close()
    with pytest.raises(NoConfigurationError):
        get_experiment("exp", storage=orion_tools.storage(database))
    assert os.path.getsize(database) > 0  # No longer empty: check-database's first test would pass it.
    return database


def test_an_emptied_database_that_orion_rewrote_is_refused(emptied_then_opened):
    result = check_database(emptied_then_opened, "--experiment", "exp")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the Oríon database {emptied_then_opened} holds fewer completed "
                                    "trials of exp (0) than its backup (1): restore the last good copy: cp ")


def test_an_emptied_database_that_orion_rewrote_keeps_the_backup(emptied_then_opened):
    good = open(f"{emptied_then_opened}.bak", "rb").read()
    check_database(emptied_then_opened, "--experiment", "exp")
    assert open(f"{emptied_then_opened}.bak", "rb").read() == good


def test_trials_removed_on_purpose_pass_once_the_backup_is_deleted(emptied_then_opened):
    os.remove(f"{emptied_then_opened}.bak")
    assert check_database(emptied_then_opened, "--experiment", "exp").returncode == 0


def test_simultaneous_checks_with_the_same_pid_do_not_collide(tmp_path):
    """Ten jobs back up at once, each with pid 1 (its own pid namespace, as in containers, or as
    on ten nodes): each one's temporary copy must have a name of its own (issue 18, finding 6)."""
    database = tmp_path / "orion_db.pkl"
    with open(database, "wb") as file:  # Large enough that the copies overlap.
        pickle.dump({"blob": os.urandom(20 << 20)}, file)
    checks = [subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-W", "ignore", "-c",
                                "import os, sys, orion_tools; assert os.getpid() == 1; "
                                "sys.exit(orion_tools.main(sys.argv[1:]))",
                                "check-database", "--database", str(database)],
                               cwd=REPO_ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(10)]
    outputs = [check.communicate(timeout=300)[0] for check in checks]
    assert [check.returncode for check in checks] == [0] * 10, outputs
    assert open(f"{database}.bak", "rb").read() == open(database, "rb").read()
    assert not list(tmp_path.glob("*.tmp"))


STOPPED_DURING_AN_OUTAGE = """
import errno, threading, time
from orion_tools import database, heartbeat
failures = [5]
def write():
    if failures[0]:
        failures[0] -= 1
        raise OSError(errno.ENOSPC, "No space left on device")
database.OUTAGE_POLL = 0.2
waiter = threading.Thread(target=database.waiting_out_outages, args=(write, "the file"))
waiter.start()
time.sleep(0.3)
heartbeat.stop_worker("this worker was taken over")
waiter.join()
"""


def test_a_stopped_workers_error_stays_its_last_line():
    """Found by the chaos run (seed 25): a worker taken over while another of its threads waited
    out a full disk said why it exits, then "... is usable again" after it (job.sh's verdict and
    the user read the last line)."""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", STOPPED_DURING_AN_OUTAGE], cwd=REPO_ROOT,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: the file cannot be used (No space left on device): waiting until it can; nothing is lost meanwhile",
        "error: this worker was taken over"]


# --- The algorithm lock (issue 18, finding 3) ----------------------------------------------------


def test_an_algorithm_lock_that_stays_taken_names_orion_db_release(experiment, database):
    storage = experiment._experiment._storage
    storage._db.write("algo", {"locked": 1}, query={"experiment": experiment.id})  # Taken, never released.
    with pytest.raises(orion_tools.AlgorithmLockTimeout) as raised:
        with orion_tools.algorithm_lock(storage, experiment=experiment._experiment, timeout=1, retry_interval=0.2):
            pass
    assert str(raised.value) == (f"the algorithm lock of experiment exp stayed taken for 1 s: if no worker of it "
                                 f"runs, release it with: ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS={database} "
                                 "uv run orion db release exp")


def test_a_missing_algorithm_record_is_named_as_such(experiment, database):
    """Not "the lock stayed taken ... release it" (issue 24): there is no lock to release."""
    storage = experiment._experiment._storage
    storage._db.remove("algo", query={"experiment": experiment.id})
    with pytest.raises(orion_tools.AlgorithmRecordMissing) as raised:
        with orion_tools.algorithm_lock(storage, experiment=experiment._experiment, timeout=30, retry_interval=0.1):
            pass
    assert str(raised.value) == (
        f"experiment exp has no algorithm record in {database} (the database was damaged or edited): restore its "
        f"last good copy (job.sh's check-database keeps {database}.bak), or start a new search with export "
        "ORION_EXPERIMENT=<a new name>")


def test_an_algorithm_lock_taken_over_meanwhile_keeps_its_new_holders_state(experiment):
    storage = experiment._experiment._storage
    with pytest.raises(orion_tools.AlgorithmLockLost):
        with orion_tools.algorithm_lock(storage, experiment=experiment._experiment, timeout=1) as locked:
            # Another worker takes it over (as `algorithm_lock` does once it is stale) and saves its state.
            storage._db.write("algo", {"heartbeat": datetime.datetime.utcnow(), "state": b"theirs"},
                              query={"experiment": experiment.id})
            locked.set_state({"mine": 1})
    [algo] = storage._db.read("algo", {"experiment": experiment.id})
    assert algo["locked"] == 1 and algo["state"] == b"theirs"


@pytest.fixture
def tpe_lock(monkeypatch):
    """benchmarks/tpe_lock.py, with the worker's produce, observe and algorithm lock (as `hunt` installs them)."""
    from conftest import import_benchmark
    from orion.core.worker.producer import Producer
    from orion.storage.legacy import Legacy
    benchmark = import_benchmark(REPO_ROOT / "benchmarks" / "tpe_lock.py")
    monkeypatch.setattr(Producer, "produce", orion_tools.produce_within_budget)
    monkeypatch.setattr(Producer, "observe", orion_tools.observe_patiently)
    monkeypatch.setattr(Legacy, "acquire_algorithm_lock", benchmark.timed_algorithm_lock)
    yield benchmark
    benchmark.use_copies("Oríon's copies")


def tpe_suggestions(tpe_lock, way: str, folder) -> tuple[list, list]:
    """(the parameters of 4 trials TPE suggests in turn after 30 completed ones, each hold of the
    algorithm lock), with Oríon's state copies or orion_tools'."""
    folder.mkdir()
    tpe_lock.use_copies(way)
    experiment = tpe_lock.experiment_with(30, folder)
    tpe_lock.HOLDS.clear()
    suggested = []
    for objective in (0.4, 0.3, 0.2, 0.1):
        trial = experiment.suggest()
        suggested.append(trial.params)
        experiment.observe(trial, [{"name": "objective", "type": "objective", "value": objective}])
    return suggested, list(tpe_lock.HOLDS)


def test_tpe_suggests_the_same_trials_with_orion_tools_state_copies(tpe_lock, tmp_path):
    """The holds' copies by a pickle round trip (install_fast_algorithm_copies, issue 18, finding 8:
    benchmarks/tpe_lock.py times them) change nothing the algorithm does."""
    orions, orions_holds = tpe_suggestions(tpe_lock, "Oríon's copies", tmp_path / "orion")
    ours, our_holds = tpe_suggestions(tpe_lock, "orion_tools", tmp_path / "orion_tools")
    assert ours == orions
    assert len({tuple(sorted(p.items())) for p in ours}) == 4  # Four different trials: TPE went on.
    assert len(our_holds) == len(orions_holds) == 8  # A hold per suggestion and per result: what the benchmark times.


def test_an_unwritable_lock_trace_is_one_warning_and_the_worker_goes_on(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(orion_tools.database, "LOCK_TRACE", str(tmp_path / "missing-folder" / "locks.jsonl"))
    monkeypatch.setattr(orion_tools.database, "TRACE_FAILED", orion_tools.threading.Event())
    orion_tools.trace_lock("database", 0.1, 0.2)
    orion_tools.trace_lock("algorithm", 0.1, 0.2)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: ORION_TOOLS_LOCK_TRACE={tmp_path}/missing-folder/locks.jsonl: cannot append to it"), warnings


def test_the_lock_trace_is_one_json_line_per_hold(monkeypatch, tmp_path):
    trace = tmp_path / "locks.jsonl"
    monkeypatch.setattr(orion_tools.database, "LOCK_TRACE", str(trace))
    orion_tools.trace_lock("database", 0.5, 0.25)
    orion_tools.trace_lock("algorithm", 0.0, 1.5)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [(line["lock"], line["waited"], line["held"], line["pid"]) for line in lines] == [
        ("database", 0.5, 0.25, os.getpid()), ("algorithm", 0.0, 1.5, os.getpid())]

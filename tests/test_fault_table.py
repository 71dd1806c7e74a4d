"""Issue 24's table of faults, one step past what the earlier tests tried, each with real
`python -m orion_tools hunt` workers (stand-in trials) on a database in a tmpfs of its own (Oríon's
soft lock, as on NFS; and a filesystem this test can fill or make read-only).

Timings are scaled down together (ORION_HEARTBEAT 4 s, the database lease 12 s, the algorithm
lock's takeover 6 s: the earlier design's margins, 4 heartbeats just outlasting the lease) and
each fault outlasts every one of them. A worker is stopped where the
fault must hit by ORION_TOOLS_TEST_PAUSE (orion_tools/database.py): it stops itself there, and
this test holds it (its whole process group, trial included: a suspended job, a stalled node) as
long as the fault lasts. Each search is then checked as a whole (`check_search`): the budget
completed exactly, no trial run to its end twice, none left reserved, no completed trial ever
rolled back (the database sampled throughout), and every worker's exit and last line.
"""

import concurrent.futures
import contextlib
import json
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import orion_tools
from conftest import REPO_ROOT, clean_env, standin_hunt_command

HEARTBEAT, LEASE, ALGORITHM_STALE = 4, 12, 6
TIMINGS = dict(ORION_HEARTBEAT=str(HEARTBEAT), ORION_TOOLS_LOCK_LEASE=str(LEASE),
               ORION_TOOLS_ALGORITHM_LOCK_STALE=str(ALGORITHM_STALE))
STALL = 45  # s: longer than the lease, 5 heartbeats and the algorithm lock's takeover together.


@contextlib.contextmanager
def small_tmpfs(folder: Path):
    """A small tmpfs of the test's own for the database: Oríon's soft lock; full or read-only at will."""
    folder.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)]).returncode != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("cannot mount a tmpfs here (not root?)")
    try:
        yield folder
    finally:
        while subprocess.run(["umount", "-l", str(folder)], capture_output=True).returncode == 0:
            pass  # A bind mount left over it, then the tmpfs.


class Search:
    """W workers of one experiment, as job.sh starts them, each in a process group of its own."""

    def __init__(self, tmp_path: Path, disk: Path, budget: int, sleep: float, algorithm: str = "random",
                 trials_on_disk: bool = False):
        self.folder, self.database, self.record = tmp_path, disk / "orion_db.pkl", tmp_path / "runs.jsonl"
        # job.sh's layout: the trials' folders beside the database, in $SCRATCH.
        self.trials_dir = disk / "trials" if trials_on_disk else tmp_path / "trials"
        self.config = tmp_path / "orion-config.yml"
        self.config.write_text(f"experiment:\n  algorithm:\n    {algorithm}:\n      seed: 1\n  max_trials: {budget}\n"
                               "worker:\n  executor: singleexecutor\n  idle_timeout: 600\n")
        self.budget, self.sleep, self.workers = budget, sleep, []
        self.rollbacks: list[str] = []
        self.sampling = threading.Event()
        self.sampler = threading.Thread(target=self.sample, daemon=True)

    def start(self, pause: str = "", **env) -> subprocess.Popen:
        log = self.folder / f"worker-{len(self.workers)}.log"
        environment = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=str(self.database), **TIMINGS, **env,
                                **({"ORION_TOOLS_TEST_PAUSE": pause} if pause else {}))
        worker = subprocess.Popen(
            standin_hunt_command("faults", self.config, self.trials_dir, "--sleep", self.sleep,
                                 "--record", self.record, worker_records=self.folder / "records"),
            cwd=REPO_ROOT, env=environment, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        worker.log = log
        self.workers.append(worker)
        if not self.sampler.is_alive():
            self.sampler.start()
        return worker

    def sample(self) -> None:
        """No completed trial ever goes back (a rollback), sampled every 0.1 s while the search runs."""
        done, seen = {}, None
        while not self.sampling.wait(0.1):
            try:
                # Read again only a file that changed (every write renames a new one in): twelve
                # searches at once, each read ten times a second, took a core of their own.
                identity = (lambda s: (s.st_ino, s.st_size, s.st_mtime_ns))(self.database.stat())
                if identity == seen:
                    continue
                database = pickle.loads(self.database.read_bytes())
                seen = identity
            except Exception:  # Missing yet, or being replaced: the next look.
                continue
            statuses = {doc["id"]: doc["status"] for doc in database._db["trials"]._documents} \
                if "trials" in database._db else {}
            for trial, status in done.items():
                if statuses.get(trial) != status:
                    self.rollbacks.append(f"trial {trial} was {status}, then {statuses.get(trial)}")
            done.update({trial: status for trial, status in statuses.items() if status in ("completed", "broken")})

    def wait(self, timeout: float = 400) -> list[int]:
        try:
            return [worker.wait(timeout=timeout) for worker in self.workers]
        finally:
            self.sampling.set()
            for worker in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)

    def runs(self) -> list[str]:
        return [json.loads(line)["trial"] for line in self.record.read_text().splitlines()] \
            if self.record.exists() else []

    def trials(self) -> list:
        return orion_tools.open_experiment(type("Args", (), {"database": str(self.database),
                                                             "experiment": "faults"}))[1]


def stopped(worker: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until `worker` has stopped itself at its pause point, then stops its whole group."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{worker.pid}/stat").read_text().split()[2] != "T":
        assert worker.poll() is None, worker.log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"the worker never reached its pause point: {worker.log.read_text()[-2000:]}"
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGSTOP)


def running_its_trial(search: Search, worker: subprocess.Popen, timeout: float = 120) -> None:
    """Waits until `worker` has started its trial's process (its worker.json is written just before)."""
    deadline = time.monotonic() + timeout
    while not any(search.trials_dir.glob("*/worker.json")):
        assert worker.poll() is None and time.monotonic() < deadline, worker.log.read_text()[-2000:]
        time.sleep(0.2)


def check_search(search: Search, exits: list[int], victims: tuple = ()) -> None:
    trials = search.trials()
    statuses = [trial.status for trial in trials]
    assert statuses.count("completed") == search.budget == len(trials), statuses  # Exact, and complete.
    assert not search.rollbacks, search.rollbacks
    runs = search.runs()
    assert sorted(runs) == sorted(set(runs)), f"trials run to their end twice: {runs}"
    assert all(trial.objective is not None for trial in trials)
    for worker, status in zip(search.workers, exits):
        log = worker.log.read_text()
        assert "Traceback" not in log, log[-3000:]
        if worker in victims:
            continue
        assert status == 0, log[-3000:]
    for victim in victims:
        if victim.returncode not in (0, -signal.SIGKILL):
            assert victim.log.read_text().splitlines()[-1].startswith("error: "), victim.log.read_text()[-2000:]


def scenario_a_worker_killed_holding_the_database_lease_stops_no_other_trial(tmp_path, disk):
    """Before: every other worker's heartbeat gave up after 4 heartbeats, stopped its trial and exited 1."""
    search = Search(tmp_path, disk, budget=4, sleep=25)
    others = [search.start() for _ in range(2)]
    time.sleep(8)  # The others run their trials.
    victim = search.start(pause="holding-database:12")
    stopped(victim)
    os.killpg(victim.pid, signal.SIGKILL)  # The node dies: the lock's marker stays, for a lease.
    assert Path(f"{search.database}.lock").exists()
    assert all(worker.poll() is None for worker in others)  # Mid-trial, all of them.
    exits = search.wait()
    check_search(search, exits, victims=(victim,))



def scenario_a_database_writer_stalled_past_every_timeout_rolls_nothing_back_and_runs_nothing_twice(tmp_path, disk, point):
    """Before: the stalled holder's lease was taken over and the others went on, but a stall before
    the rename wrote a stale copy back (a rollback), and a long stall cascaded like a dead holder."""
    search = Search(tmp_path, disk, budget=5, sleep=25)
    others = [search.start() for _ in range(2)]
    time.sleep(8)  # The others run their trials.
    victim = search.start(pause=f"{point}:12")
    stopped(victim)
    assert all(worker.poll() is None for worker in others)  # Mid-trial, all of them.
    time.sleep(STALL)
    os.killpg(victim.pid, signal.SIGCONT)
    exits = search.wait()
    check_search(search, exits, victims=(victim,))



def scenario_an_algorithm_lock_taken_over_during_a_suggestion_keeps_the_budget_exact(tmp_path, disk):
    """Before: the stalled holder registered what it had suggested after the takeover: one trial over budget."""
    search = Search(tmp_path, disk, budget=4, sleep=3)
    victim = search.start(pause="holding-algorithm:1")
    stopped(victim)
    others = [search.start() for _ in range(2)]
    time.sleep(STALL)  # The others take the lock over and run the budget meanwhile, or most of it.
    os.killpg(victim.pid, signal.SIGCONT)
    exits = search.wait()
    check_search(search, exits, victims=(victim,))
    assert exits[0] == 0, victim.log.read_text()[-2000:]  # The stalled holder just asked again.
    assert any("took over the algorithm lock" in worker.log.read_text() for worker in others)



def scenario_a_result_observed_during_a_takeover_is_shown_to_the_algorithm(tmp_path, disk):
    """Before: the stalled holder's state was (rightly) not saved, and its worker stopped: the
    trial it was showing the algorithm was never shown to the stored algorithm."""
    search = Search(tmp_path, disk, budget=3, sleep=2)
    victim = search.start(pause="in-observe:1")
    stopped(victim)
    search.start()
    time.sleep(STALL)
    os.killpg(victim.pid, signal.SIGCONT)
    exits = search.wait()
    check_search(search, exits, victims=(victim,))
    assert exits[0] == 0, victim.log.read_text()[-2000:]
    from orion.client import get_experiment
    experiment = get_experiment("faults", mode="w", storage=orion_tools.storage(str(search.database)))
    with experiment._experiment.acquire_algorithm_lock(timeout=10) as algorithm:
        assert all(algorithm.has_observed(trial) for trial in search.trials())



def scenario_a_full_or_read_only_database_filesystem_loses_no_result(tmp_path, disk, fault):
    """The database's filesystem full or read-only, with the trials' folders on it (job.sh's
    layout: both in $SCRATCH). Before: every worker crashed with a traceback (`OSError: [Errno
    28] No space left on device`), and trials that had run to their end lost their results."""
    search = Search(tmp_path, disk, budget=6, sleep=5, trials_on_disk=True)
    workers = [search.start() for _ in range(3)]
    time.sleep(12)  # Trials run, and end during the fault.
    filler = disk / "filler"
    if fault == "full":
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "status=none"])  # Until it is full.
    else:  # A read-only bind mount over it: `remount,ro` is refused while a file is open for writing.
        assert subprocess.run(["mount", "--bind", str(disk), str(disk)]).returncode == 0
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(disk)]).returncode == 0
    time.sleep(STALL)
    if fault == "full":
        filler.unlink()
    else:
        assert subprocess.run(["umount", str(disk)]).returncode == 0  # The bind mount: writable again.
    exits = search.wait()
    check_search(search, exits)
    assert all("cannot be used" in worker.log.read_text() for worker in workers)



def scenario_a_trial_whose_worker_stalled_stops_before_its_end_once_taken_over(tmp_path, disk):
    """A worker stalled (its trial runs on: the trial on local disk, the worker on a stalled file
    server) past its trial's loss: the trial, run again by another worker, is not also finished here.
    Before: the first run finished too (its end recorded twice), then its worker stopped."""
    search = Search(tmp_path, disk, budget=1, sleep=40)
    victim = search.start()
    running_its_trial(search, victim)
    os.kill(victim.pid, signal.SIGSTOP)  # The worker only: its trial's process runs on.
    other = search.start()
    time.sleep(45)  # Taken for lost, run again by the other worker, and past the first run's end.
    os.kill(victim.pid, signal.SIGCONT)
    exits = search.wait()
    check_search(search, exits, victims=(victim,))
    assert exits[1] == 0, other.log.read_text()



def scenario_a_worker_killed_after_its_trial_ended_loses_no_result(tmp_path, disk):
    """A worker killed after its trial ran to its end, before it recorded the result (the node
    died): the next worker records that result, found in the trial's folder, without running the
    trial again. Before: the trial ran again, to its end (twice)."""
    search = Search(tmp_path, disk, budget=2, sleep=3)
    victim = search.start(pause="trial-ended:1")
    stopped(victim)
    os.killpg(victim.pid, signal.SIGKILL)
    search.start()
    exits = search.wait()
    check_search(search, exits, victims=(victim,))
    assert "that result is recorded now, without running the trial again" in search.workers[1].log.read_text()


def scenario_a_new_worker_finishes_the_trial_that_dead_workers_left(tmp_path, disk):
    """Every worker of a search killed (the job's nodes failed) while one holds the last trial;
    a worker started later (the job resubmitted) stays, watches that trial's heartbeat stand still,
    and runs it: the search completes."""
    search = Search(tmp_path, disk, budget=1, sleep=10)
    victim = search.start()
    running_its_trial(search, victim)
    os.killpg(victim.pid, signal.SIGKILL)
    search.start()
    exits = search.wait()
    check_search(search, exits, victims=(victim,))
    assert len(search.runs()) == 1


# --- The tests: each scenario above runs in a thread of its own, all at once ----------------------
# They mostly wait (for stalls to end, for timeouts to pass): together they take as long as the
# longest, about two minutes, not the sum. Each test reads its scenario's outcome (its assertion,
# if one failed).
SCENARIOS = {
    "killed holding the lease": (scenario_a_worker_killed_holding_the_database_lease_stops_no_other_trial, ()),
    "stalled holding the lease": (
        scenario_a_database_writer_stalled_past_every_timeout_rolls_nothing_back_and_runs_nothing_twice,
        ("holding-database",)),
    "stalled before the rename": (
        scenario_a_database_writer_stalled_past_every_timeout_rolls_nothing_back_and_runs_nothing_twice,
        ("before-rename",)),
    "takeover during a suggestion": (scenario_an_algorithm_lock_taken_over_during_a_suggestion_keeps_the_budget_exact, ()),
    "takeover during an observe": (scenario_a_result_observed_during_a_takeover_is_shown_to_the_algorithm, ()),
    "full": (scenario_a_full_or_read_only_database_filesystem_loses_no_result, ("full",)),
    "read-only": (scenario_a_full_or_read_only_database_filesystem_loses_no_result, ("read-only",)),
    "worker stalled, trial running": (scenario_a_trial_whose_worker_stalled_stops_before_its_end_once_taken_over, ()),
    "killed after its trial's end": (scenario_a_worker_killed_after_its_trial_ended_loses_no_result, ()),
    "all workers killed": (scenario_a_new_worker_finishes_the_trial_that_dead_workers_left, ()),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    # Made here, not in the threads: pytest's tmp_path_factory is not thread-safe.
    folders = {name: tmp_path_factory.mktemp(name.replace(" ", "-").replace(",", "").replace("'", ""))
               for name in SCENARIOS}

    def run(name):
        scenario, arguments = SCENARIOS[name]
        with small_tmpfs(folders[name] / "database") as disk:
            scenario(folders[name], disk, *arguments)
    with concurrent.futures.ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(run, name) for name in SCENARIOS}
        concurrent.futures.wait(futures.values())
    return futures


def test_a_worker_killed_holding_the_database_lease_stops_no_other_trial(outcomes):
    outcomes["killed holding the lease"].result()


@pytest.mark.parametrize("point", ["holding-database", "before-rename"])
def test_a_database_writer_stalled_past_every_timeout_rolls_nothing_back_and_runs_nothing_twice(outcomes, point):
    outcomes["stalled holding the lease" if point == "holding-database" else "stalled before the rename"].result()


def test_an_algorithm_lock_taken_over_during_a_suggestion_keeps_the_budget_exact(outcomes):
    outcomes["takeover during a suggestion"].result()


def test_a_result_observed_during_a_takeover_is_shown_to_the_algorithm(outcomes):
    outcomes["takeover during an observe"].result()


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_database_filesystem_loses_no_result(outcomes, fault):
    outcomes[fault].result()


def test_a_trial_whose_worker_stalled_stops_before_its_end_once_taken_over(outcomes):
    outcomes["worker stalled, trial running"].result()


def test_a_worker_killed_after_its_trial_ended_loses_no_result(outcomes):
    outcomes["killed after its trial's end"].result()


def test_a_new_worker_finishes_the_trial_that_dead_workers_left(outcomes):
    outcomes["all workers killed"].result()

"""Our own chaos test (issue 24): the invariant checker of tests/chaos.py on crafted bad searches
(it must catch each), the plans reproducible from a seed, and a reduced run of
benchmarks/chaos.py's series: two searches of real hunt workers under randomized faults (a kill
and its replacement, stalls of workers and lock holders, the database's filesystem full and
read-only, a slow hold), checked end to end, 0 violations. The long run: benchmarks/chaos.py
(RESULTS.md).
"""

import concurrent.futures
import importlib.util
import os
import sys
from pathlib import Path

import pytest

import chaos
from conftest import REPO_ROOT, standin_hunt_command

# --- The checker, on crafted searches -----------------------------------------------------------

LEARNING_RATES = {"a": 1e-3, "b": 1e-2}


def clean_outcome() -> dict:
    """A search of budget 2 that went right: two trials completed, each run to its end once."""
    trials = [{"id": t, "status": "completed", "objective": chaos.standin_objective(lr), "learning_rate": lr}
              for t, lr in LEARNING_RATES.items()]
    runs = [{"trial": t, "pid": 11, "host": "node-0", "start": 0.0, "end": 3.0} for t in LEARNING_RATES]
    worker = {"name": "worker #0", "exit": 0, "killed_by_harness": False, "killed_at_timeout": False,
              "stdout": "No trial left for this worker: done.\n", "stderr": "",
              "records": [{"trial": t, "outcome": "completed"} for t in LEARNING_RATES],
              "verdict": 0, "verdict_output": "This job ran 2 trial(s) of experiment chaos: 2 completed\n"}
    return {"budget": 2, "trials": trials, "database_error": None, "runs": runs, "workers": [worker],
            "rollbacks": [], "database_reads": 10, "timed_out": False}


def spoilt(change) -> dict:
    outcome = clean_outcome()
    change(outcome)
    return outcome


def test_a_clean_search_has_no_violation():
    assert chaos.check(clean_outcome()) == []


def set_trial(outcome, trial_id, **fields):
    next(t for t in outcome["trials"] if t["id"] == trial_id).update(fields)


def add_worker(outcome, **fields):
    worker = {"name": "worker #1", "exit": 0, "killed_by_harness": False, "killed_at_timeout": False,
              "stdout": "", "stderr": "", "records": [], "verdict": 0, "verdict_output": ""}
    worker.update(fields)
    outcome["workers"].append(worker)


CRAFTED = {
    "a trial run to its end twice": (
        lambda o: o["runs"].append({"trial": "a", "pid": 12, "host": "node-1", "start": 1.0, "end": 4.0}),
        "trial a ran to its end 2 times"),
    "a trial left reserved": (
        lambda o: (set_trial(o, "b", status="reserved", objective=None), o["runs"].pop(),
                   o["workers"][0]["records"].pop()),
        "trial b left reserved"),
    "a finished run whose result was lost": (
        lambda o: (set_trial(o, "b", status="interrupted", objective=None), o["workers"][0]["records"].pop()),
        "trial b ran to its end but is interrupted: its result was lost"),
    "a traceback": (
        lambda o: o["workers"][0].update(stderr="Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                               "OSError: [Errno 28] No space left on device\n", exit=1, verdict=1),
        "worker #0: a traceback in its output (OSError: [Errno 28] No space left on device)"),
    "a worker that failed without an error line": (
        lambda o: o["workers"][0].update(exit=1, stderr="warning: something\n", verdict=1),
        "worker #0: exit 1, and its last line is not an `error:` line"),
    "a worker that exited 0 after an error line": (
        lambda o: o["workers"][0].update(stderr="error: the heartbeat could not be written\n"),
        "worker #0: exit 0 after an error line"),
    "a worker killed by a signal the harness did not send": (
        lambda o: o["workers"][0].update(exit=-6, verdict=1),
        "worker #0: killed by signal 6"),
    "the budget overshot": (
        lambda o: o["trials"].append({"id": "c", "status": "new", "objective": None, "learning_rate": 0.1}),
        "budget overshot: 3 trials for a budget of 2"),
    "a search short of its budget, silently": (
        lambda o: o.update(budget=3),
        "2 of 3 trials completed, and no worker said why"),
    "a broken trial": (
        lambda o: (set_trial(o, "b", status="broken", objective=None), o["runs"].pop(),
                   o["workers"][0]["records"].pop()),
        "trial b broken"),
    "a completed trial without its objective": (
        lambda o: set_trial(o, "a", objective=None),
        "completed trial a has no objective"),
    "a completed trial with another objective than its run's": (
        lambda o: set_trial(o, "a", objective=0.5),
        "completed trial a's objective 0.5 is not its run's"),
    "a completed trial that never ran to its end": (
        lambda o: o["runs"].pop(),
        "completed trial b never ran to its end"),
    "a worker's record of a completed trial the database does not have completed": (
        lambda o: add_worker(o, records=[{"trial": "c", "outcome": "completed"}]),
        "worker #1 recorded trial c completed; the database has it missing"),
    "job.sh's verdict at odds with the worker's exit": (
        lambda o: add_worker(o, exit=1, stderr="error: stopped\n", verdict=0),
        "worker #1: job.sh's verdict 0 for a worker that exited 1"),
    "a search that did not end": (
        lambda o: (o.update(timed_out=True), add_worker(o, exit=-9, killed_at_timeout=True)),
        "the search did not end in time: worker #1 still running, killed"),
    "a trial that outlived its worker": (
        lambda o: o.update(left_running=["worker #0: 123 (python)"]),
        "still running after its worker exited: worker #0: 123 (python)"),
    "an unreadable database": (
        lambda o: o.update(database_error="UnpicklingError: invalid load key"),
        "the database is unreadable at the end"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_the_checker_catches(case):
    change, expected = CRAFTED[case]
    violations = chaos.check(spoilt(change))
    assert any(v.startswith(expected) for v in violations), violations


def test_a_visible_failure_excuses_a_short_search_but_nothing_else():
    """Short of the budget, with a worker that stopped saying why: no violation for that alone."""
    outcome = spoilt(lambda o: (o.update(budget=3), add_worker(o, exit=1, verdict=1,
                                                               stderr="warning: late\nerror: the lock was lost\n")))
    assert chaos.check(outcome) == []


def test_a_worker_the_harness_killed_is_not_held_to_its_exit():
    outcome = spoilt(lambda o: add_worker(o, exit=-9, killed_by_harness=True, verdict=None))
    assert chaos.check(outcome) == []


def snapshot(**statuses) -> list:
    return [{"id": t, "status": s, "objective": 1.0 if s == "completed" else None, "learning_rate": 0.1}
            for t, s in statuses.items()]


@pytest.mark.parametrize("later, expected", [
    (snapshot(a="reserved", b="completed"), "rollback: trial a, completed at 1.0 s, is reserved at 2.0 s"),
    (snapshot(b="completed"), "rollback: trial a disappeared from the database at 2.0 s"),
    ([{"id": "a", "status": "completed", "objective": 2.0, "learning_rate": 0.1}] + snapshot(b="completed"),
     "rollback: trial a's objective changed from 1.0 to 2.0 at 2.0 s"),
])
def test_the_watch_catches_a_rollback(later, expected):
    watch = chaos.DatabaseWatch()
    watch.observe(snapshot(a="new", b="reserved"), 0.0)
    watch.observe(snapshot(a="completed", b="completed"), 1.0)
    watch.observe(later, 2.0)
    watch.observe(later, 3.0)  # Said once.
    assert expected in watch.violations and len(watch.violations) == len(set(watch.violations)), watch.violations
    assert chaos.check({**clean_outcome(), "rollbacks": watch.violations})  # A rollback is a violation.


def test_the_watch_sees_the_completed_count_fall_and_lets_trials_move_on():
    watch = chaos.DatabaseWatch()
    watch.observe(snapshot(a="reserved", b="new"), 0.0)
    watch.observe(snapshot(a="interrupted", b="reserved"), 1.0)  # Not final yet: no rollback.
    watch.observe(snapshot(a="completed", b="completed"), 2.0)
    assert watch.violations == []
    watch.observe(snapshot(a="completed", b="reserved"), 3.0)
    assert "rollback: completed trials fell from 2 to 1 at 3.0 s" in watch.violations


def test_the_watch_reads_the_file_and_flags_one_that_stays_unreadable(tmp_path):
    database = tmp_path / "orion_db.pkl"
    watch = chaos.DatabaseWatch()
    watch.look(database, 0.0)  # Not there yet: nothing.
    database.write_bytes(b"not a pickle")
    watch.look(database, 1.0)
    assert watch.violations and watch.violations[0].startswith("database unreadable at 1.0 s"), watch.violations


# --- The plans -------------------------------------------------------------------------------------

def test_a_seed_reproduces_its_search():
    assert chaos.plan_search(7) == chaos.plan_search(7)
    assert chaos.plan_search(7).faults != chaos.plan_search(8).faults


def test_an_option_given_leaves_the_other_draws():
    drawn, fixed = chaos.plan_search(7), chaos.plan_search(7, workers=9)
    assert fixed.workers == 9 and fixed.budget == drawn.budget and fixed.algorithm == drawn.algorithm
    assert [(f.kind, f.seconds, f.rule, f.point) for f in fixed.faults] == \
        [(f.kind, f.seconds, f.rule, f.point) for f in drawn.faults]


def test_the_stalls_span_every_timeout():
    """Over a series, stalls well below the lease's half and well above every timeout (issue 24:
    no fault length breaks it)."""
    t = chaos.Timings()
    stalls = [f.seconds for seed in range(1, 51) for f in chaos.plan_search(seed).faults if f.kind == "stop"]
    assert min(stalls) < t.lease / 2 and max(stalls) > 3 * max(5 * t.heartbeat, t.algorithm_stale, t.database_timeout)


def test_the_workers_start_as_jobsh_starts_them(tmp_path):
    command = chaos.hunt_command(tmp_path / "c.yml", tmp_path / "trials", tmp_path / "records", chaos.SLEEP,
                                 tmp_path / "runs.jsonl")
    assert command == standin_hunt_command(chaos.EXPERIMENT, tmp_path / "c.yml", tmp_path / "trials",
                                           "--sleep~uniform(2, 6)", "--record", tmp_path / "runs.jsonl",
                                           worker_records=tmp_path / "records")


# --- The reduced run ------------------------------------------------------------------------------

def load_benchmark():
    """benchmarks/chaos.py, as `chaos_benchmark` (conftest's import_benchmark would name it `chaos`,
    the harness's name); it uses the harness imported here."""
    benchmarks = str(REPO_ROOT / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    spec = importlib.util.spec_from_file_location("chaos_benchmark", REPO_ROOT / "benchmarks" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# Seed 1: one fault of each kind; seed 2: its own draw. Stalls up to 30 s (above every timeout:
# tests/chaos.py, Timings), to keep the run near 2 minutes on 2 cores.
REDUCED = [(1, ["kill", "stop", "full", "read-only", "slow-hold", "stop"]), (2, None)]


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    if not Path("/proc/self/stat").exists():
        pytest.skip("the harness reads /proc (Linux)")
    if os.geteuid() != 0 and not Path("/dev/shm").is_dir():
        pytest.skip("neither root (a tmpfs of its own) nor /dev/shm: nowhere for the soft-lock database")
    benchmark = load_benchmark()
    root = tmp_path_factory.mktemp("chaos")

    def search(seed, kinds) -> list:
        return benchmark.run_series([seed], root, kinds=kinds, faults=None if kinds else 5, max_stall=30.0,
                                    max_filesystem=15.0, timeout=300.0, keep=True, out=lambda line: None)["results"]
    # Side by side, as benchmarks/chaos.py's long run was (each search has its own folder and tmpfs):
    # the searches mostly wait, for their faults and timeouts.
    with concurrent.futures.ThreadPoolExecutor(len(REDUCED)) as pool:
        return [result for results in pool.map(lambda plan: search(*plan), REDUCED) for result in results]


def evidence(results) -> str:
    return "\n".join(f"{chaos.one_line(r)}\n  " + "\n  ".join(r["violations"] + r["harness_errors"])
                     + f"\n  kept: {r['folder']}" for r in results)


def test_the_reduced_run_injects_its_faults(reduced_run):
    assert not any(r["harness_errors"] for r in reduced_run), evidence(reduced_run)
    assert sum(r["faults_applied"] for r in reduced_run) >= 6, evidence(reduced_run)
    if os.geteuid() == 0:
        applied = chaos.applied_by_kind(reduced_run)
        assert applied["full"] and applied["read-only"], evidence(reduced_run)


def test_the_reduced_run_breaks_no_invariant(reduced_run):
    assert not any(r["violations"] for r in reduced_run), evidence(reduced_run)

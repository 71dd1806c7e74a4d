"""Shared fixtures: the data set's generated sample, and helpers to run main.py, Oríon and Slurm.

Nothing here depends on CIFAR-10: the data come from the module main.py imports as `dataset`
(its `write_sample` and `stage`), so these tests keep working when main.py trains on other data.
Only tests/test_cifar10.py is about CIFAR-10 itself.
"""

import importlib.util
import os
import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

# The suite runs four pytest-xdist workers, their trials and their Slurm jobs' trials on two
# cores, each torch process with several OpenMP threads (job.sh: the task's --cpus-per-task).
# OpenMP's waiting threads spin by default: with more threads than cores, four concurrent
# trials took 2 min 14 s instead of 23 s (benchmarks/RESULTS.md, "Test suite"). Waiting threads
# sleep instead, in this process (before torch loads) and every process it starts, Slurm's jobs
# included (sbatch passes the environment on).
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import main  # noqa: E402  (after OMP_WAIT_POLICY: it imports torch)

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_PY = REPO_ROOT / "main.py"
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"  # The README's reference pages.
# A light stand-in for main.py, for tests of the search machinery (see its docstring).
STANDIN_TRIAL = REPO_ROOT / "tests" / "standin_trial.py"


def standin_hunt_command(experiment: str, config: Path, working_dir: Path, *trial_args,
                         worker_records: Path | None = None) -> list[str]:
    """An `python -m orion_tools hunt` worker as job.sh starts one (run it from REPO_ROOT), with the
    stand-in as its trial and `--learning-rate` searched. --working-dir as in job.sh: without it
    each worker makes a temporary folder for the trials and deletes it when it exits, under the
    trials the other workers still run."""
    records = ["--worker-records", str(worker_records)] if worker_records else []
    return [sys.executable, "-W", "ignore", "-m", "orion_tools", "hunt", *records, "-n", experiment,
            "--config", str(config), "--working-dir", str(working_dir),
            sys.executable, str(STANDIN_TRIAL), "--learning-rate~loguniform(1e-5, 1.0)",
            *map(str, trial_args)]


# The human line main.py logs per epoch, a format kept for people who grep it; everything else
# that tests check about an epoch comes from the trial's metrics.jsonl (`read_metrics`).
EPOCH_LINE = re.compile(r"^Epoch (\d+): (.*); ([^;\n]+): (\S+)$", re.M)  # The metrics, then the objective.
OBJECTIVE_LINE = re.compile(rf"Objective \({re.escape(main.OBJECTIVE)}\): \S+")


def write_sample(folder: Path, size: int | None = None) -> Path:
    """The data set's small generated sample, in its own format (what job.sh stages): its path.
    `size`: how many examples (the module's default if None)."""
    return main.dataset.write_sample(Path(folder), *([size] if size else []))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A --data-dir holding the data set's sample, staged as job.sh stages it (read-only use:
    copy it before changing it). Small enough for a CPU epoch of a few seconds."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "staged").mkdir()
    main.dataset.stage(folder / "staged", write_sample(folder / "source"))
    return folder / "staged"


def import_benchmark(script: Path):
    """A script of benchmarks/ as a module, as it imports its neighbours (`import common`)."""
    benchmarks = str(REPO_ROOT / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclasses look their module up there.
    spec.loader.exec_module(module)
    return module


def clean_env(**overrides) -> dict:
    """The environment for a child process, without Oríon or Slurm variables leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORION_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_main(*args, env=None, timeout=600, **popen_kwargs) -> subprocess.CompletedProcess:
    """Runs main.py in a fresh Python process (as Oríon does) and captures its output."""
    return subprocess.run(
        [sys.executable, str(MAIN_PY), *map(str, args)],
        env=env if env is not None else clean_env(),
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, **popen_kwargs,
    )


# `python -m orion_tools ...`, which then prints on its last stderr line the heavy modules it
# imported: Oríon's client and worker, scipy (1.7 s of CPU in all).
LISTING_HEAVY_IMPORTS = (
    "import runpy, sys\ntry:\n    runpy.run_module('orion_tools', run_name='__main__', alter_sys=True)\nfinally:\n"
    "    print(sorted(name for name in sys.modules if name.startswith(('orion.client', 'orion.core.worker', 'scipy'))),"
    " file=sys.stderr)")


def orion_tools_listing_heavy_imports(*args, **env) -> tuple[subprocess.CompletedProcess, str]:
    """Runs `python -m orion_tools ARGS`; returns (the run, the heavy modules it imported, as listed)."""
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", LISTING_HEAVY_IMPORTS, *map(str, args)],
                            cwd=REPO_ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120)
    return result, (result.stderr.splitlines() or [""])[-1]


def wait_for(predicate, timeout, what, process=None):
    """Polls `predicate`; fails after `timeout` s, or as soon as `process` (if any) ends."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} ended ({process.returncode}) before {what}: "
                                 f"{process.stdout.read()}{process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def read_metrics(trial_dir: Path) -> list[dict]:
    """main.py's per-epoch records (metrics.jsonl in the trial's folder)."""
    return [json.loads(line) for line in (Path(trial_dir) / "metrics.jsonl").read_text().splitlines()]


def learning_curve(trial_dir: Path) -> list[dict]:
    """What must not change when a run is interrupted and resumed: each epoch's training loss,
    evaluate()'s metrics and the objective (every field of metrics.jsonl but timings and memory)."""
    from trial_support import RECORD_FIELDS

    kept = ("epoch", "train_loss", "objective", "untrained_objective")
    return [{key: value for key, value in record.items() if key not in RECORD_FIELDS or key in kept}
            for record in read_metrics(trial_dir)]


def readme_commands(program: str) -> list[str]:
    """The `program ...` lines of the code blocks of the README and its pages in docs/, without
    trailing comments."""
    commands, in_code = [], False
    text = "\n".join(page.read_text() for page in [README, *sorted(DOCS.glob("*.md"))])
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.strip().removeprefix("$ ").startswith(program + " "):
            commands.append(line.strip().removeprefix("$ ").split(" #")[0].strip())
    return commands


# --- A real single-node Slurm cluster (tests/slurm/cluster.sh) ----------------------------

CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"


# --- How pytest-xdist shares the tests out (pyproject.toml: -n 4 --dist loadgroup) ----------------
# Tests that share a module-scoped fixture (an ASHA search, a dry run, a benchmark's row...) run
# in one worker, which builds it once: each such set is an `xdist_group`. Every other test goes
# to whichever worker is free. The slowest go first, so that no long test starts last and runs
# alone at the end: SLOW_TESTS, seconds, from the suite's profile (benchmarks/RESULTS.md, "Test
# suite"); only the order depends on them.
SLOW_TESTS = {  # Setup and call, the runs of 2026-12-02 15:25 and (the larger ones) 2026-12-05 13:05.
    "test_make_it_yours.py::test_the_pipeline_tests_pass_unchanged_on_the_new_data": 100,  # Each of 3.
    "test_job_dry_run.py::test_rerun_of_an_asha_search_extends_it": 160,
    "test_preemption_slurm.py::test_time_limit_signal_checkpoints_and_requeues": 138,
    "test_preemption_slurm.py::test_requeued_array_resumes_its_trials": 170,
    "test_job_asha.py::test_asha_runs_its_budget": 107,
    "test_job.py::test_array_job_runs_the_search_and_readme_commands_show_it": 119,
    "test_orion.py::test_hunt_three_trials_then_info_and_plot": 119,
    "test_make_it_yours.py::test_dry_run_of_the_search_searches_the_new_hyperparameter": 70,
    "test_make_it_yours.py::test_resume_after_sigterm_reproduces_the_run": 32,
    "test_orion.py::test_diverged_trials_complete_and_the_search_goes_on": 125,
    "test_streaming.py::test_sigterm_mid_epoch_then_resume_reproduces_the_run": 30,
    "test_streaming.py::test_the_data_set_is_four_times_the_memory_the_trial_is_allowed": 70,  # The photos' setup.
    "test_db_faults.py::test_a_late_heartbeat_does_not_make_a_live_trial_lost": 26,
    "test_patches.py::test_every_installed_patch_has_a_row_and_every_row_is_installed": 20,
    "test_orion_own_tests.py::test_orions_warm_start_tests_have_the_same_outcomes_with_and_without_the_replacements": 54,
    "test_job_dry_run.py::test_runs_outside_slurm_on_a_workstation": 81,
    "test_benchmarks.py::test_quick_run_exits_0": 12,  # Each of 7: the quick runs start together.
    "test_job.py::test_job_whose_trials_break_fails": 42,
    "test_job.py::test_five_workers_share_one_gpu_concurrently": 138,
    "test_job_dry_run.py::test_rerun_with_other_main_py_arguments_is_refused": 73,
    "test_job_dry_run.py::test_rerun_with_another_algorithm_is_refused": 69,
    "test_job_dry_run.py::test_rerun_with_a_larger_budget_and_other_workers_extends_the_search": 71,
    "test_report.py::test_report_exits_0": 51,
    "test_preemption.py::test_finished_checkpoint_reports_without_retraining": 49,
    "test_make_it_yours.py::test_a_trial_trains_on_the_new_data_and_model": 22,
    "test_preemption.py::test_sigterm_mid_epoch_then_resume_reproduces_the_run": 64,
    "test_preemption_hunt.py::test_trial_of_a_killed_worker_is_finished_by_another": 32,
    "test_preemption.py::test_promotion_to_more_epochs_equals_training_straight_there": 32,
    "test_db_stress.py::test_every_trial_of_the_budget_completes": 29,
    # Issue 24 (2026-12-05): the fault table's eight scenarios run at once in one module fixture;
    # the chaos test's reduced run is two searches.
    "test_fault_table.py::test_a_worker_killed_holding_the_database_lease_stops_no_other_trial": 93,
    "test_chaos.py::test_the_reduced_run_injects_its_faults": 46,
}
UNKNOWN_TEST_SECONDS = 1


def module_fixtures(item) -> list[tuple]:
    """The module-scoped fixture instances `item` uses: each named with the parameters of the
    module-scoped fixtures the test uses (a fixture built on a parametrized one, as
    test_make_it_yours's `uninterrupted` on `project`, is one instance per parameter)."""
    info = getattr(item, "_fixtureinfo", None)
    params = getattr(getattr(item, "callspec", None), "params", {})
    names = [name for name in getattr(item, "fixturenames", ())
             if info and info.name2fixturedefs.get(name) and info.name2fixturedefs[name][-1].scope == "module"]
    instance = repr(sorted((name, repr(params[name])) for name in names if name in params))
    return [(item.path, name, instance) for name in names]


def expected_seconds(item) -> float:
    return SLOW_TESTS.get(f"{item.path.name}::{item.originalname}", UNKNOWN_TEST_SECONDS)


@pytest.hookimpl(tryfirst=True)  # Before pytest-xdist's own hook reads the xdist_group marks.
def pytest_collection_modifyitems(config, items):
    # Tests connected through shared module fixtures form a group (union-find over the fixtures).
    parent = list(range(len(items)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    owner = {}
    for i, item in enumerate(items):
        for fixture in module_fixtures(item):
            if fixture in owner:
                parent[root(i)] = root(owner[fixture])
            else:
                owner[fixture] = i
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(root(i), []).append(item)
    seconds = {key: sum(expected_seconds(item) for item in members) for key, members in groups.items()}
    order = sorted(groups, key=lambda key: (-seconds[key], key))  # Deterministic: every worker alike.
    items[:] = [item for key in order for item in groups[key]]
    for key in order:
        if len(groups[key]) > 1:
            first = groups[key][0]
            for item in groups[key]:
                item.add_marker(pytest.mark.xdist_group(f"{first.path.stem}-{key}"))


def slurm_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "starting a Slurm cluster needs root (to install Debian's packages and run the daemons)"
    if not (shutil.which("apt-get") or shutil.which("slurmctld") or os.path.exists("/usr/sbin/slurmctld")):
        return "no apt-get to install Slurm from Debian's packages"
    return None


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory, worker_id):
    """Starts a real single-node Slurm (or joins the one another pytest worker started: pytest-xdist's
    workers share it, and their jobs run side by side); yields the environment to submit jobs with.
    The last worker to leave stops it.

    Skips with the reason where it cannot start, except under CI (CI=true), where the real-Slurm
    tests must run: there a failure to start fails the tests.
    """
    reason = slurm_unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-Slurm tests, but {reason}")
        pytest.skip(reason)
    # The folder above the workers' own temporary folders ("master": no xdist, then our own).
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    state_dir, running, users = shared / "slurm", shared / "slurm-running", shared / "slurm-users"
    with filelock.FileLock(shared / "slurm.lock"):
        if not running.exists():
            started = subprocess.run(["bash", CLUSTER_SH, "start", state_dir], capture_output=True, text=True,
                                     timeout=600)
            if started.returncode != 0:
                message = f"could not start Slurm: {started.stderr.strip()[-2000:]}"
                if os.environ.get("CI"):
                    pytest.fail(message)
                pytest.skip(message)
            running.write_text(started.stdout.strip().removeprefix("export SLURM_CONF="))
        users.mkdir(exist_ok=True)
        (users / worker_id).touch()
        slurm_conf = running.read_text()
    try:
        yield clean_env(SLURM_CONF=slurm_conf, PATH=f"/usr/sbin:/usr/bin:{os.environ['PATH']}")
    finally:
        with filelock.FileLock(shared / "slurm.lock"):
            (users / worker_id).unlink()
            if not any(users.iterdir()):
                subprocess.run(["bash", CLUSTER_SH, "stop", state_dir], capture_output=True, timeout=300)
                running.unlink()


def read_trials(database: Path, experiment: str | None = None) -> list[dict]:
    """Every trial document in a PickledDB file (optionally of one experiment, by name)."""
    with open(database, "rb") as file:
        db = pickle.load(file)._db
    trials = db["trials"].find({})
    if experiment is not None:
        ids = {e["_id"] for e in db["experiments"].find({"name": experiment})}
        trials = [t for t in trials if t["experiment"] in ids]
    return trials


# --- Submitting job.sh ------------------------------------------------------------------


def make_job_env(folder: Path, size: int | None = None) -> dict:
    """What a user has: $SCRATCH, a home for Oríon's global config, the data set where job.sh stages it from."""
    return {"SCRATCH": folder / "scratch", "XDG_CONFIG_HOME": folder / "config",
            main.dataset.SOURCE_VARIABLE: write_sample(folder / "datasets", size)}


@pytest.fixture
def job_env(tmp_path):
    return make_job_env(tmp_path)


def database(env, dry_run: bool = False) -> str:
    """job.sh's database: of the search under Slurm, or (dry_run) of `bash job.sh` without Slurm."""
    return f"{env['SCRATCH']}/orion-example{'-dry-run' if dry_run else ''}/orion_db.pkl"


def job_environment(job_env: dict, base: dict | None = None, **extra_env) -> dict:
    """The environment to run job.sh with: `base` (default: a clean one), the user's settings, `extra_env`."""
    return {**(base if base is not None else clean_env()), **{k: str(v) for k, v in {**job_env, **extra_env}.items()}}


def trials_dir(job_env: dict, dry_run: bool = False) -> Path:
    """Where job.sh keeps the trials' folders of the default experiment (dry_run: without Slurm)."""
    return Path(job_env["SCRATCH"]) / f"orion-example{'-dry-run' if dry_run else ''}" / "orion-example"


def submit(slurm_env, job_env, tmp_path, *args, timeout=900, **extra_env) -> subprocess.Popen:
    """`sbatch --wait ARGS` in the background, output files in `tmp_path`; its first line names the job."""
    return subprocess.Popen(
        ["timeout", str(timeout), "sbatch", "--wait", f"--output={tmp_path}/slurm-%A_%a.out", *map(str, args)],
        env=job_environment(job_env, slurm_env, **extra_env), cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def sbatch_wait(slurm_env, job_env, tmp_path, *args, timeout=900, **extra_env):
    """Submits job.sh with `sbatch --wait`; returns (exit code, the jobs' output files' text)."""
    sbatch = submit(slurm_env, job_env, tmp_path, *args, timeout=timeout, **extra_env)
    _, stderr = sbatch.communicate()
    outputs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    return sbatch.returncode, stderr + outputs

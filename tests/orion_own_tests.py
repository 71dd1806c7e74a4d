#!/usr/bin/env python
"""Oríon 0.2.7's own tests, run without and with orion_tools' replacements: every difference explained.

    uv run tests/orion_own_tests.py [--groups worker storage database client] [--sdist DIR]
                                    [--cache DIR] [--json OUT] [--jobs N] [--list]

Oríon's PyPI sdist ships its test tree. This fetches it with the machine's pip (the project's
environment, made by uv, has none), with pytest-mock (some of those tests spy through `mocker`),
and runs each group of tests twice with the project's installed Oríon, each time in a pytest
process and a copy of the test tree of its own, each test file in a process forked from it: once
as Oríon ships, once with every replacement of orion_tools/patches.py installed
(`patches.DATABASE + patches.WORKER`, read when the tests start). A test whose outcome differs
between the two must be in INTENDED_DIFFERENCES, with the replacement that causes it. An unlisted
difference (seen again when its test file is run once more: one that is not is reported as
flaky), a listed test that no longer differs, or a run that did not finish makes it exit 1, one
line per surprise. Tests that fail in both modes (numpy 2 against Oríon's one-hot transform...)
are no difference: the summary lists them. docs/orion-own-tests.md: when to run it, and how long
it takes; tests/test_orion_own_tests.py runs the `quick` group in the suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ORION = ("orion", "0.2.7")
PYTEST_MOCK = ("pytest-mock", "3.16.0")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orion-own-tests"

# Oríon's tests of what the replacements touch, by group: paths (or test ids) in the sdist.
WORKER = "tests/unittests/core/worker"
GROUPS = {
    "worker": [WORKER],  # Producer, Consumer, Experiment, TrialPacemaker, the algorithm copies.
    "storage": ["tests/unittests/storage"],  # Legacy: the algorithm lock, heartbeats, results.
    "database": ["tests/unittests/core/database"],  # PickledDB.
    "client": ["tests/unittests/client"],  # The client, and the runner's signal handler (Protected).
    "io": ["tests/unittests/core/io"],  # Experiments built from and stored in the database.
    "hunt": ["tests/functional/commands/test_hunt_command.py"],  # `orion hunt`, end to end.
    "demo": ["tests/functional/demo"],  # Whole searches (with Oríon's test algorithm, gradient_descent).
    # What the suite runs (tests/test_orion_own_tests.py): the test files of most replacements, but
    # not the slow ones (the pacemaker's tests sleep for seconds, the Consumer's and the runner's
    # start processes): those run in `worker` and `client`.
    "quick": ["tests/unittests/storage", "tests/unittests/core/database/test_pickleddb.py",
              f"{WORKER}/test_experiment.py", f"{WORKER}/test_producer.py",
              "tests/unittests/client/test_experiment_client.py",
              f"{WORKER}/warm_start/test_multi_task.py::TestMultiTaskWrapper::test_with_warmstarteable_algo"],
}
DEFAULT_GROUPS = ["worker", "storage", "database", "client"]

# Every test whose outcome the replacements change, and why: the replacement (orion_tools/patches.py)
# that causes it. The one list: docs/orion-own-tests.md points here.
_PACEMAKER = ("`TrialPacemaker.run` -> heartbeat.beat writes the heartbeat every ORION_HEARTBEAT (the worker's "
              "heartbeat setting), not every `wait_time` s: the test's 1-5 s wait sees no new heartbeat")
_LOST = ("`Experiment.fix_lost_trials` -> lost_trials.fix_lost_trials takes a trial for lost only after this worker "
         "has watched its heartbeat stand still for 5 x ORION_HEARTBEAT, not at once from an old heartbeat")
_KEPT = ("`Legacy.push_trial_results` -> heartbeat.push_results_of_this_reservation also records the result of a "
         "trial that is no longer reserved (taken for lost meanwhile: new, interrupted or suspended)")
INTENDED_DIFFERENCES = {
    f"{WORKER}/test_trial_pacemaker.py::test_trial_update_heartbeat": _PACEMAKER,
    f"{WORKER}/test_trial_pacemaker.py::test_trial_heartbeat_not_updated": _PACEMAKER,
    f"{WORKER}/test_trial_pacemaker.py::test_trial_heartbeat_not_updated_inbetween": _PACEMAKER,
    f"{WORKER}/test_experiment.py::TestReserveTrial::test_fix_lost_trials": _LOST,
    f"{WORKER}/test_experiment.py::TestReserveTrial::test_fix_lost_trials_configurable_hb": _LOST,
    f"{WORKER}/test_experiment.py::TestReserveTrial::test_fix_only_lost_trials": _LOST,
    f"{WORKER}/test_experiment.py::TestReserveTrial::test_fix_lost_trials_race_condition": (
        "`Experiment.fix_lost_trials` -> lost_trials.fix_lost_trials judges from what it watched, not from "
        "`Legacy.fetch_lost_trials` (which the test fakes), and logs no 'failed' for a trial already released"),
    "tests/unittests/storage/test_legacy.py::TestLegacyStorage::test_push_trial_results_unreserved": _KEPT,
    "tests/unittests/client/test_experiment_client.py::TestObserve::test_observe_race_condition": _KEPT,
    "tests/unittests/storage/test_storage.py::TestStorage::test_acquire_algorithm_lock_timeout[None]": (
        "`Legacy.acquire_algorithm_lock` -> algorithm_lock.algorithm_lock raises AlgorithmLockTimeout (a "
        "DatabaseLockError, which stops the worker with one line), not LockAcquisitionTimeout (which Oríon retries)"),
    "tests/unittests/storage/test_storage.py::TestStorage::test_acquire_algorithm_lock_not_initialised[None]": (
        "`Legacy.acquire_algorithm_lock` -> algorithm_lock.algorithm_lock names a missing algorithm record "
        "(AlgorithmRecordMissing) instead of timing out as if the lock were taken"),
    "tests/unittests/core/database/test_pickleddb.py::test_query_timeout": (
        "`PickledDB.locked_database` -> database.fenced_locked_database raises DatabaseTimeout with one line of its "
        "own, not Oríon's 'Could not acquire lock for PickledDB after ...' that the test matches"),
}

# --- Fetching Oríon's test tree -----------------------------------------------------------------


class Unavailable(Exception):
    """The registry could not be reached, or did not have what is needed."""


def machine_pip() -> str:
    outside = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                              if p and not p.startswith(str(REPO_ROOT)) and ".venv" not in p)
    pip = shutil.which("pip3", path=outside) or shutil.which("pip", path=outside)
    if not pip:
        raise Unavailable("no pip outside the project's environment")
    return pip


def download(requirement: str, folder: Path, *options: str) -> None:
    done = subprocess.run([machine_pip(), "download", "--quiet", "--no-deps", *options, requirement, "-d", str(folder)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise Unavailable(f"pip download {requirement}: {done.stderr.strip()[-500:]}")


def fetch(cache: Path = DEFAULT_CACHE, sdist: Path | None = None) -> tuple[Path, Path]:
    """(Oríon's extracted sdist, a folder with pytest-mock to put on PYTHONPATH), fetched into `cache`
    unless there already (or the sdist given). Raises Unavailable when they cannot be fetched."""
    cache.mkdir(parents=True, exist_ok=True)
    name, version = ORION
    if sdist is not None and (sdist / f"{name}-{version}").is_dir():
        sdist = sdist / f"{name}-{version}"  # The folder it was extracted into.
    if sdist is not None and not (sdist / "tests" / "conftest.py").exists():
        raise Unavailable(f"{sdist} holds no extracted sdist of Oríon {version}")
    sdist = sdist or cache / f"{name}-{version}"
    if not (sdist / "tests" / "conftest.py").exists():
        archive = cache / f"{name}-{version}.tar.gz"
        if not archive.exists():
            download(f"{name}=={version}", cache, "--no-binary", ":all:")
        unpacked = Path(tempfile.mkdtemp(dir=cache))  # Then renamed: a concurrent run sees all or nothing.
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        with_rename(unpacked / sdist.name, sdist)
    name, version = PYTEST_MOCK
    site = cache / f"site-{name}-{version}"
    if not site.exists():
        wheels = Path(tempfile.mkdtemp(dir=cache))
        download(f"{name}=={version}", wheels, "--only-binary", ":all:")
        [wheel] = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as pure:  # A pure-Python wheel, unpacked, is importable as it is.
            pure.extractall(wheels / "site")
        with_rename(wheels / "site", site)
    return sdist, site


def with_rename(source: Path, target: Path) -> None:
    try:
        source.rename(target)
    except OSError:  # Another run was first.
        pass
    shutil.rmtree(source.parent, ignore_errors=True)


# --- Running tests, in one mode ---------------------------------------------------------------------

# Loaded with `-p` in both modes: each test file's tests run in a process of their own, forked from
# pytest's (the replacements keep a worker's state in its process: budget.RAN_A_TRIAL,
# heartbeat.WORKER_STOPPED...; so a test's outcome depends on its file only, not on the files run
# before it), with a time limit per test; each test's outcome (the worst of its setup, call and
# teardown) is written to OWN_TESTS_REPORT.
REPORT_PLUGIN = '''
import json, os, select, signal, sys, time
import pytest
from _pytest.reports import TestReport
from _pytest.runner import runtestprotocol
SEVERITY = ["passed", "skipped", "xfailed", "xpassed", "failed", "error"]
outcomes, messages, durations = {}, {}, {}
TIMEOUT = float(os.environ.get("OWN_TESTS_TIMEOUT", "120"))

@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    if os.environ.get("OWN_TESTS_FORK") != "1" or session.config.option.collectonly:
        return None
    files = {}
    for item in session.items:
        files.setdefault(item.path, []).append(item)
    for items in files.values():
        run_file(session.config, items)
    return True

def run_file(config, items):
    sys.stdout.flush(), sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # The file's tests, one line of reports each.
        os.close(read)
        try:
            with os.fdopen(write, "w") as out:
                for i, item in enumerate(items):
                    reports = runtestprotocol(item, log=False, nextitem=items[i + 1] if i + 1 < len(items) else None)
                    out.write(json.dumps([config.hook.pytest_report_to_serializable(config=config, report=r)
                                          for r in reports]) + "\\n")
                    out.flush()
        finally:
            os._exit(0)
    os.close(write)
    pending, buffer, why = list(items), b"", None
    with os.fdopen(read, "rb") as pipe:
        deadline = time.monotonic() + TIMEOUT
        while pending:
            if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.kill(pid, signal.SIGKILL)
                why = f"timed out after {TIMEOUT:g} s"
                break
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\\n" in buffer:
                line, buffer = buffer.split(b"\\n", 1)
                log(pending.pop(0), [config.hook.pytest_report_from_serializable(config=config, data=data)
                                     for data in json.loads(line)])
                deadline = time.monotonic() + TIMEOUT
    status = os.waitpid(pid, 0)[1]
    if pending:  # That test failed; the file's next ones run in a process of their own.
        why = why or f"its process ended (wait status {status})"
        log(pending[0], [TestReport(pending[0].nodeid, pending[0].location, {}, "failed", why, "call")])
        if pending[1:]:
            run_file(config, pending[1:])

def log(item, reports):
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

def record(test, outcome):
    if test not in outcomes or SEVERITY.index(outcome) > SEVERITY.index(outcomes[test]):
        outcomes[test] = outcome

def why(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    return ((crash.message if crash else str(report.longrepr)).strip() or "?").splitlines()[0][:300]

def pytest_runtest_logreport(report):
    durations[report.nodeid] = durations.get(report.nodeid, 0) + report.duration
    if report.when == "call" and hasattr(report, "wasxfail"):
        record(report.nodeid, "xfailed" if report.skipped else "xpassed")
    elif report.when == "call" or not report.failed:
        record(report.nodeid, report.outcome)
    else:
        record(report.nodeid, "error")
    if report.failed:
        messages.setdefault(report.nodeid, why(report))

def pytest_collectreport(report):
    if report.failed:
        record(report.nodeid or "<collection>", "error")
        messages.setdefault(report.nodeid or "<collection>", why(report))

def pytest_sessionfinish(session):
    patched = sys.modules.get("orion_own_tests_patched")
    with open(os.environ["OWN_TESTS_REPORT"], "w") as out:
        json.dump({"outcomes": outcomes, "messages": messages, "durations": durations,
                   "patches": getattr(patched, "TARGETS", [])}, out)
'''
# Loaded with `-p` in the patched mode, before Oríon's tests (and their conftest.py) import anything.
PATCH_PLUGIN = '''
from orion_tools import patches
INSTALLED = patches.DATABASE + patches.WORKER
patches.install(INSTALLED)
TARGETS = [patch.target for patch in INSTALLED]
'''
# Oríon's test algorithm, which its tox installs: its module is in the sdist, its entry point here.
GRADIENT_DESCENT = "tests/functional/gradient_descent_algo/src"
ENTRY_POINT = "[BaseAlgorithm]\ngradient_descent = orion.algo.gradient_descent:Gradient_Descent\n"


@dataclass
class Run:
    name: str
    patched: bool
    outcomes: dict[str, str]  # Test id: passed, failed, error, skipped, xfailed or xpassed.
    messages: dict[str, str]  # Test id: the first line of its failure or error.
    durations: dict[str, float]  # Test id: seconds (setup, call and teardown).
    seconds: float  # The whole pytest process.
    problem: str = ""  # Why the run did not finish (then `outcomes` may be partial or empty).
    patches: tuple[str, ...] = ()  # The Oríon attributes replaced (patched mode).

    @property
    def mode(self) -> str:
        return "with" if self.patched else "without"

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def write_plugins(workdir: Path) -> Path:
    plugins = workdir / "plugins"
    info = plugins / "orion.algo.gradient_descent-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (plugins / "orion_own_tests_report.py").write_text(REPORT_PLUGIN)
    (plugins / "orion_own_tests_patched.py").write_text(PATCH_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: orion.algo.gradient_descent\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINT)
    return plugins


def run_tests(sdist: Path, site: Path, name: str, paths: list[str], patched: bool, workdir: Path,
              test_timeout: float = 120, timeout: float = 1800, fork: bool = True) -> Run:
    """Runs Oríon's tests at `paths` (in the sdist) in a pytest process of their own, in a copy of
    the sdist's test tree (the tests write files beside them and in $TMPDIR/orion), with the
    project's installed Oríon and, if `patched`, every replacement installed."""
    folder = workdir / f"{name}-{'with' if patched else 'without'}"
    plugins = write_plugins(workdir)
    shutil.copytree(sdist / "tests", folder / "tests")
    # The one test file that names a temporary folder of its own: each run its own.
    consumer = folder / "tests" / "unittests" / "core" / "worker" / "test_consumer.py"
    consumer.write_text(consumer.read_text().replace('"/tmp/orion"', repr(str(folder / "tmp" / "orion"))))
    (folder / "tmp").mkdir()
    (folder / "pytest.ini").write_text("[pytest]\n")  # The rootdir; no configuration from above.
    report = folder / "outcomes.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORION_", "SLURM_", "PYTEST_"))}
    env.update(OWN_TESTS_REPORT=str(report), OWN_TESTS_TIMEOUT=f"{test_timeout:g}", OWN_TESTS_FORK=str(int(fork)),
               PYTHONUNBUFFERED="1", TMPDIR=str(folder / "tmp"),
               # A runner test wants an empty stderr from a child that imports Oríon (pkg_resources warns).
               PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(map(str, [plugins, site, folder / GRADIENT_DESCENT, REPO_ROOT])),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))  # Oríon's `orion`.
    command = [sys.executable, "-m", "pytest", "-q", "-c", str(folder / "pytest.ini"), "-p", "no:cacheprovider",
               "-p", "no:xdist", "-p", "pytest_mock", "-p", "orion_own_tests_report",
               *(["-p", "orion_own_tests_patched"] if patched else []), "-W", "ignore",
               *(["-p", "no:timeout"] if fork else [f"--timeout={test_timeout:g}"]),
               "--continue-on-collection-errors", *paths]
    start = time.monotonic()
    problem = ""
    try:
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode not in (0, 1):  # 1: some tests failed; anything else: pytest did not run them all.
            problem = f"pytest exited {done.returncode}: {(done.stdout + done.stderr).strip()[-1500:]}"
    except subprocess.TimeoutExpired as expired:
        problem = f"did not finish in {timeout:g} s: {str(expired.stdout or '')[-1500:]}"
    seconds = time.monotonic() - start
    found = {"outcomes": {}, "messages": {}, "durations": {}, "patches": []}
    if report.exists():
        found = json.loads(report.read_text())
    if not found["outcomes"] and not problem:
        problem = "no test ran"
    if patched and not found["patches"] and not problem:
        problem = "no replacement was installed"
    return Run(name, patched, found["outcomes"], found["messages"], found["durations"], seconds, problem,
               tuple(found["patches"]))


# --- Comparing ---------------------------------------------------------------------------------------

BROKEN = ("failed", "error")


def covers(paths: list[str], test: str) -> bool:
    """Whether running `paths` runs `test`."""
    return any(test == path or test.startswith((path.rstrip("/") + "/", path + "::", path + "["))
               for path in paths)


def differences(without: Run, with_: Run) -> dict[str, tuple[str | None, str | None]]:
    """{test id: (outcome without, outcome with)} of the tests whose outcome differs (None: not run)."""
    tests = sorted(set(without.outcomes) | set(with_.outcomes))
    return {test: (without.outcomes.get(test), with_.outcomes.get(test)) for test in tests
            if without.outcomes.get(test) != with_.outcomes.get(test)}


@dataclass
class Result:
    """One group of Oríon's tests, without and with the replacements."""
    group: str
    paths: list[str]
    without: Run
    with_: Run
    flaky: dict[str, tuple] = field(default_factory=dict)  # Unlisted differences not seen again.

    @property
    def differences(self) -> dict[str, tuple[str | None, str | None]]:
        return {test: pair for test, pair in differences(self.without, self.with_).items() if test not in self.flaky}

    def unlisted(self) -> list[str]:
        return [test for test in differences(self.without, self.with_) if test not in INTENDED_DIFFERENCES]

    @property
    def surprises(self) -> list[str]:
        """One line per surprise: a run that did not finish, an unlisted difference, or a listed
        test (among those run) that no longer differs."""
        lines = [f"{self.group} ({run.mode} the replacements): {run.problem}"
                 for run in (self.without, self.with_) if run.problem]
        if lines:
            return lines
        found = self.differences
        for test, (before, after) in found.items():
            if test not in INTENDED_DIFFERENCES:
                why = self.with_.messages.get(test) or self.without.messages.get(test) or ""
                lines.append(f"unlisted difference: {test}: {before} without the replacements, {after} with them: {why}")
        for test, reason in INTENDED_DIFFERENCES.items():
            if covers(self.paths, test) and test not in found:
                outcome = self.without.outcomes.get(test)
                state = f"{outcome} in both modes" if outcome else "not run"
                lines.append(f"listed difference no longer seen: {test}: {state} (listed: {reason})")
        return lines

    def summary(self) -> list[str]:
        def counts(run: Run) -> str:
            return ", ".join(f"{n} {outcome}" for outcome, n in sorted(run.counts().items())) or "nothing"
        lines = [f"{self.group}: without {counts(self.without)} ({self.without.seconds:.0f} s); "
                 f"with {counts(self.with_)} ({self.with_.seconds:.0f} s)"]
        for test, (before, after) in self.differences.items():
            reason = INTENDED_DIFFERENCES.get(test) or "NOT LISTED: " + (
                self.with_.messages.get(test) or self.without.messages.get(test) or "")
            lines.append(f"  differs: {test}: {before} -> {after}: {reason}")
        for test, (before, after) in self.flaky.items():
            lines.append(f"  flaky (differed once, {before} -> {after}, not when run again): {test}")
        for test, outcome in sorted(self.without.outcomes.items()):
            if outcome in BROKEN and self.with_.outcomes.get(test) in BROKEN:
                lines.append(f"  {outcome} in both modes (no difference): {test}: {self.without.messages.get(test, '')}")
        return lines

    def as_json(self) -> dict:
        return {"paths": self.paths, "surprises": self.surprises,
                "differences": {test: list(pair) for test, pair in self.differences.items()},
                "flaky": {test: list(pair) for test, pair in self.flaky.items()},
                **{run.mode: {"seconds": round(run.seconds, 1), "counts": run.counts(), "problem": run.problem,
                              "patches": list(run.patches), "outcomes": run.outcomes, "messages": run.messages,
                              "durations": {test: round(t, 2) for test, t in run.durations.items()}}
                   for run in (self.without, self.with_)}}


def check(sdist: Path, site: Path, groups: dict[str, list[str]], workdir: Path, jobs: int = 2,
          test_timeout: float = 120, fork: bool = True) -> list[Result]:
    """Runs each group (name: paths in the sdist) without and with the replacements, `jobs` pytest
    processes at a time; then the test files of each unlisted difference once more in both modes,
    and counts only the differences seen again."""
    def both(runs: dict[tuple[str, bool], list[str]]) -> dict[tuple[str, bool], Run]:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {key: pool.submit(run_tests, sdist, site, key[0], paths, key[1], workdir, test_timeout,
                                        fork=fork)
                       for key, paths in runs.items()}
            return {key: future.result() for key, future in futures.items()}
    done = both({(name, patched): paths for name, paths in groups.items() for patched in (False, True)})
    results = [Result(name, paths, done[name, False], done[name, True]) for name, paths in groups.items()]
    again = {result.group: result.unlisted() for result in results
             if result.unlisted() and not result.without.problem and not result.with_.problem}
    files = {name: sorted({test.split("::")[0] for test in tests}) for name, tests in again.items()}
    rerun = both({(f"{name}-again", patched): paths for name, paths in files.items() for patched in (False, True)})
    for result in results:
        if result.group in again:
            seen = differences(rerun[f"{result.group}-again", False], rerun[f"{result.group}-again", True])
            result.flaky = {test: pair for test, pair in differences(result.without, result.with_).items()
                            if test in again[result.group] and test not in seen}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=DEFAULT_GROUPS,
                        help=f"default: {' '.join(DEFAULT_GROUPS)}")
    parser.add_argument("--sdist", type=Path, help="Oríon 0.2.7's extracted sdist (default: fetched into --cache)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"default: {DEFAULT_CACHE}")
    parser.add_argument("--json", type=Path, help="write every outcome, per group and mode, here")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at a time (default: 2)")
    parser.add_argument("--test-timeout", type=float, default=120, help="s, per test (default: 120)")
    parser.add_argument("--list", action="store_true", help="print INTENDED_DIFFERENCES as a Markdown table, and exit")
    parser.add_argument("--no-fork", action="store_true",
                        help="run a group's tests one after the other in one process, as Oríon does (to compare)")
    args = parser.parse_args(argv)
    if args.list:
        print("| Oríon's test | why it differs with the replacements |\n|---|---|")
        print("\n".join(f"| `{test}` | {reason} |" for test, reason in INTENDED_DIFFERENCES.items()))
        return 0
    if importlib.util.find_spec("orion") is None:
        print(f"no Oríon in {sys.executable}: run it with the project's environment: uv run tests/orion_own_tests.py",
              file=sys.stderr)
        return 2
    try:
        sdist, site = fetch(args.cache, args.sdist)
    except Unavailable as why:
        print(f"cannot fetch Oríon's tests: {why}", file=sys.stderr)
        return 2
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="orion-own-tests-") as workdir:
        results = check(sdist, site, {name: GROUPS[name] for name in args.groups}, Path(workdir), args.jobs,
                        args.test_timeout, fork=not args.no_fork)
    patched = next((result.with_.patches for result in results if result.with_.patches), ())
    print(f"Oríon {ORION[1]}'s own tests, without and with {len(patched)} replacements "
          f"({time.monotonic() - start:.0f} s): {', '.join(patched)}")
    for result in results:
        print("\n".join(result.summary()))
    found = [line for result in results for line in result.surprises]
    if args.json:
        args.json.write_text(json.dumps({"patches": list(patched), "surprises": found,
                                         "groups": {result.group: result.as_json() for result in results}}, indent=1))
    if found:
        print(f"\n{len(found)} surprise(s) (list a difference in INTENDED_DIFFERENCES, {Path(__file__).name}, only "
              "if the replacement meant it, with the replacement that causes it):")
        print("\n".join(found))
        return 1
    print("No surprise: every difference is listed, and every listed one was seen.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

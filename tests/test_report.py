"""orion_tools report and summary: what the user sees at the end of a search (and during it).

Real Oríon, real PickledDB: a real ASHA search by `python -m orion_tools hunt` workers running the
stand-in trial (tests/standin_trial.py, which writes main.py's metrics.jsonl), then the
report's command line as job.sh runs it (kaleido included); the cases around it (a search
under way, an empty or missing experiment) run in-process, their PNG writer stubbed out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from orion.client import build_experiment, get_experiment

import orion_tools
from conftest import REPO_ROOT, clean_env, standin_hunt_command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["regret.png", "parallel_coordinates.png", "partial_dependencies.png", "learning_curves.png"]
BUDGET = 8
STANDIN_EPOCH_SECONDS = 1.5 + 0.25  # The stand-in's train_seconds + val_seconds per epoch.


def orion_tools_command(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "orion_tools", *map(str, args)], cwd=REPO_ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> dict:
    """A finished ASHA search (--epochs the fidelity: 1, 2, 4) of BUDGET trials by 2 hunt workers."""
    root = tmp_path_factory.mktemp("search")
    database, trials_dir = root / "orion_db.pkl", root / "exp"
    config = root / "orion-config.yml"
    config.write_text(f"experiment:\n  algorithm:\n    asha:\n      seed: 1\n      num_brackets: 1\n"
                      f"  max_trials: {BUDGET}\nworker:\n  executor: singleexecutor\n  idle_timeout: 600\n")
    command = standin_hunt_command("exp", config, trials_dir,
                                   "--checkpoint-dir", "{trial.working_dir}", "--epochs~fidelity(1, 4, base=2)")
    env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=database)
    workers = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    for worker in workers:
        worker.wait(timeout=300)
    return {"database": database, "trials_dir": trials_dir, "output": root / "exp-report"}


@pytest.fixture(scope="module")
def report_run(search) -> subprocess.CompletedProcess:
    """`orion_tools report` with its defaults: the trials and the report beside the database."""
    return orion_tools_command("report", "--experiment", "exp", "--database", search["database"])


@pytest.fixture(scope="module")
def summary_txt(search, report_run) -> str:
    path = search["output"] / "summary.txt"
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def orions_best(search):
    """The best trial as Oríon's own statistics see it, not as orion_tools does."""
    stats = get_experiment("exp", storage=orion_tools.storage(str(search["database"]))).stats
    return stats.best_trials_id, stats.best_evaluation


def metrics_files(trials_dir: Path) -> dict[str, list[dict]]:
    """Every trial folder's metrics.jsonl, parsed here."""
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in trials_dir.glob("*/metrics.jsonl")}


def test_report_exits_0(report_run):
    assert report_run.returncode == 0, report_run.stdout + report_run.stderr


@pytest.mark.parametrize("name", PLOTS)
def test_report_writes_a_png(search, report_run, name):
    path = search["output"] / name
    assert (path.read_bytes()[:8] if path.exists() else b"no file") == PNG_MAGIC


def test_summary_names_the_best_trial(summary_txt, orions_best):
    best_id, _ = orions_best
    assert f"Best trial: {best_id}," in summary_txt


def test_summary_names_the_best_objective(summary_txt, orions_best):
    _, best_objective = orions_best
    assert f"Best objective: {best_objective:.4f}" in summary_txt


def test_summary_names_the_best_trials_folder(search, summary_txt, orions_best):
    best_id, _ = orions_best
    assert f"folder {search['trials_dir'] / best_id}\n" in summary_txt


def test_summary_counts_trials_by_status(summary_txt):
    assert f"Trials: {BUDGET} of a budget of {BUDGET} ({BUDGET} completed); the search is done" in summary_txt


def test_summary_lists_the_reports_files(summary_txt):
    assert [f"  {name}" for name in [*PLOTS, "summary.txt"]] == summary_txt.splitlines()[-5:]


def test_report_prints_the_summary(report_run, summary_txt):
    assert summary_txt in report_run.stdout


def test_report_prints_its_path_last(search, report_run):
    assert report_run.stdout.splitlines()[-1] == f"Report: {search['output']}"


def test_some_trial_started_in_a_copy_of_its_parents_folder(search):
    # ASHA promoted a trial: Oríon copied its parent's metrics.jsonl into its folder.
    records = [record["end_time"] for records in metrics_files(search["trials_dir"]).values() for record in records]
    assert len(records) > len(set(records))


def test_summary_counts_each_epoch_once(search, summary_txt):
    epochs = {record["end_time"] for records in metrics_files(search["trials_dir"]).values() for record in records}
    assert f"Epochs trained: {len(epochs)} " in summary_txt


def test_summary_counts_each_epochs_device_time_once(search, summary_txt):
    epochs = {record["end_time"] for records in metrics_files(search["trials_dir"]).values() for record in records}
    assert f"({len(epochs) * STANDIN_EPOCH_SECONDS:.0f} s on cpu)" in summary_txt


def test_learning_curves_are_the_metrics_files(search):
    experiment = get_experiment("exp", storage=orion_tools.storage(str(search["database"])))
    trials = experiment.fetch_trials()
    figure = orion_tools.learning_curves(
        trials, {t.id: orion_tools.read_metrics(search["trials_dir"] / t.id) for t in trials})
    plotted = {trace.name[:8]: list(trace.y) for trace in figure.data}
    curve = lambda records: ([records[0]["untrained_objective"]] if records[0]["epoch"] == 0 else []) + [  # noqa: E731
        r["objective"] for r in records]
    expected = {trial_id[:8]: curve(sorted(records, key=lambda r: r["epoch"]))
                for trial_id, records in metrics_files(search["trials_dir"]).items()}
    assert plotted == expected
    names = {r.name for t in trials for r in t.results if r.type == "objective"}
    assert figure.layout.yaxis.title.text == names.pop()  # The objective's own name, not "accuracy".


# --- summary: cheap, one or two lines ------------------------------------------------------------

@pytest.fixture(scope="module")
def summary_run(search) -> subprocess.CompletedProcess:
    return orion_tools_command("summary", "--experiment", "exp", "--database", search["database"])


def test_summary_command_prints_two_lines(summary_run):
    assert len(summary_run.stdout.splitlines()) == 2, summary_run.stdout + summary_run.stderr


def test_summary_command_names_the_best_objective_and_trial(summary_run, orions_best):
    best_id, best_objective = orions_best
    assert f"Best objective so far: {best_objective:.4f} (trial {best_id}: epochs=" in summary_run.stdout


def test_summary_command_counts_trials_by_status(summary_run):
    assert f"{BUDGET} trials ({BUDGET} completed)" in summary_run.stdout


# --- In-process: a search under way, --if-done, a broken or empty experiment -----------------------

@pytest.fixture
def no_kaleido(monkeypatch) -> list:
    """write_png writes a stub file (no Chromium); returns the names of the files it wrote."""
    written = []

    def write_png(figure, path):
        path.write_bytes(PNG_MAGIC)
        written.append(path.name)

    monkeypatch.setattr(orion_tools.reporting, "write_png", write_png)
    return written


@pytest.fixture
def under_way(tmp_path) -> Path:
    """A search of 4 trials: 1 completed (2 epochs), 1 reserved without metrics yet, 2 waiting (interrupted)."""
    database = tmp_path / "orion_db.pkl"
    experiment = build_experiment("exp", space={"lr": "loguniform(1e-5, 1)"}, max_trials=4,
                                  storage=orion_tools.storage(str(database)))
    done = experiment.insert(params={"lr": 1e-3}, results=[{"name": "objective", "type": "objective", "value": 0.3}])
    (tmp_path / "exp" / done.id).mkdir(parents=True)
    (tmp_path / "exp" / done.id / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "objective": 0.5 - e / 10, "train_seconds": 10.0, "val_seconds": 1.0,
                    "end_time": 1000.0 + e, "device": "cuda"}) + "\n" for e in range(2)))
    running = experiment.insert(params={"lr": 1e-2})
    experiment.storage.set_trial_status(running, status="reserved")
    (tmp_path / "exp" / running.id).mkdir()  # main.py is still starting: no metrics.jsonl.
    experiment.insert(params={"lr": 1e-1})
    experiment.insert(params={"lr": 1e-4})
    return database


def report_main(database, *args) -> int:
    return orion_tools.main(["report", "--experiment", "exp", "--database", str(database), *map(str, args)])


def test_report_during_the_search_exits_0(under_way, no_kaleido):
    assert report_main(under_way) == 0


def test_report_during_the_search_says_why_partial_dependence_is_missing(under_way, no_kaleido):
    report_main(under_way)
    summary = (under_way.parent / "exp-report" / "summary.txt").read_text()
    assert "partial_dependencies.png: not made: needs 5 completed trials (1 so far)" in summary


def test_report_during_the_search_counts_trials_by_status(under_way, no_kaleido):
    report_main(under_way)
    summary = (under_way.parent / "exp-report" / "summary.txt").read_text()
    assert "Trials: 4 of a budget of 4 (2 interrupted, 1 completed, 1 reserved); the search is not done" in summary


def test_report_during_the_search_counts_device_time(under_way, no_kaleido):
    report_main(under_way)
    summary = (under_way.parent / "exp-report" / "summary.txt").read_text()
    assert "(22 s on cuda)" in summary


def test_report_if_done_during_the_search_writes_nothing(under_way, no_kaleido):
    report_main(under_way, "--if-done")
    assert not (under_way.parent / "exp-report").exists()


def test_report_if_done_during_the_search_says_how_to_make_one_with_uv(under_way, no_kaleido, capsys):
    report_main(under_way, "--if-done")
    assert "(make one now with: uv run python -m orion_tools report --experiment exp " in capsys.readouterr().out


def test_report_if_done_during_the_search_ends_with_the_summary(under_way, no_kaleido, capsys):
    report_main(under_way, "--if-done")
    assert capsys.readouterr().out.splitlines()[-1].startswith("Best objective so far: 0.3000 (trial ")


def test_report_if_done_after_the_search_writes_the_report(search, no_kaleido, tmp_path):
    report_main(search["database"], "--if-done", "--trials-dir", search["trials_dir"], "--output", tmp_path / "r")
    assert (tmp_path / "r" / "summary.txt").exists()


def test_report_if_done_is_made_once_for_a_search_as_it_stands(search, no_kaleido, tmp_path, capsys):
    """Every task of an array job asks for the report when the search is done: the first makes it;
    the others say who does, and end with the summary."""
    args = ["--if-done", "--trials-dir", search["trials_dir"], "--output", tmp_path / "r"]
    assert report_main(search["database"], *args) == 0
    made = list(no_kaleido)
    assert made and (tmp_path / "r" / "summary.txt").exists()
    capsys.readouterr()
    assert report_main(search["database"], *args) == 0
    assert no_kaleido == made  # No plot made twice.
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"The report of this search is made once, by process {os.getpid()} on ")
    assert "make it with: uv run python -m orion_tools report --experiment exp " in out[0]
    assert out[-1].startswith("Best objective so far: ")
    # Without --if-done (by hand), it is made again.
    assert report_main(search["database"], "--trials-dir", search["trials_dir"], "--output", tmp_path / "r") == 0
    assert len(no_kaleido) == 2 * len(made)


def test_report_of_an_experiment_without_trials_exits_1(tmp_path, no_kaleido):
    build_experiment("exp", space={"lr": "loguniform(1e-5, 1)"}, storage=orion_tools.storage(str(tmp_path / "db.pkl")))
    assert report_main(tmp_path / "db.pkl") == 1


def test_report_of_an_experiment_without_trials_says_so_in_one_line(tmp_path, no_kaleido, capsys):
    build_experiment("exp", space={"lr": "loguniform(1e-5, 1)"}, storage=orion_tools.storage(str(tmp_path / "db.pkl")))
    report_main(tmp_path / "db.pkl")
    assert capsys.readouterr().err.splitlines() == [f"error: experiment exp in {tmp_path / 'db.pkl'} has no trial yet"]


def test_summary_of_a_missing_experiment_exits_1(search):
    assert orion_tools.main(["summary", "--experiment", "other", "--database", str(search["database"])]) == 1


def test_summary_of_a_damaged_database_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "db.pkl").write_bytes(b"\x80\x04 cut short")
    orion_tools.main(["summary", "--experiment", "exp", "--database", str(tmp_path / "db.pkl")])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'db.pkl'} is not a readable PickledDB file")


# --- Counting epochs: a promoted trial's copy of its parent's records ------------------------------

def test_unique_epochs_counts_a_copied_parents_records_once():
    parent = [{"epoch": e, "end_time": 100.0 + e} for e in range(2)]
    child = [*parent, *({"epoch": e, "end_time": 200.0 + e} for e in range(2, 4))]
    assert len(orion_tools.unique_epochs({"parent": parent, "child": child})) == 4


def test_unique_epochs_keeps_records_without_end_time_per_trial():
    assert len(orion_tools.unique_epochs({"a": [{"epoch": 0}], "b": [{"epoch": 0}]})) == 2

"""End to end: real `orion hunt` workers run main.py against a real PickledDB file."""

import math
import subprocess
import sys

import pytest

from conftest import MAIN_PY, REPO_ROOT, clean_env, read_metrics, read_trials


def orion(*args, env, timeout=600):
    return subprocess.run(
        ["uv", "run", "--offline", "--locked", "orion", *map(str, args)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_hunt_three_trials_then_info_and_plot(data_dir, tmp_path):
    database = tmp_path / "orion.pkl"
    config = tmp_path / "orion-config.yml"
    config.write_text(
        "experiment:\n"
        "  algorithm:\n    random:\n      seed: 1\n"
        "  max_trials: 3\n  max_broken: 1\n"
        f"storage:\n  database:\n    type: pickleddb\n    host: {database}\n"
    )
    # ORION_DB_* are read by every subcommand; `--config` storage is ignored by some of them.
    env = clean_env(HOME=tmp_path, ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=database)
    hunt = orion(
        "hunt", "-n", "test-hunt", "--config", config, "--working-dir", tmp_path / "trials",
        "python", MAIN_PY, "--data-dir", data_dir, "--epochs", "1", "--batch-size", "64",
        "--learning-rate~loguniform(1e-4, 1e-2)",
        env=env,
    )
    assert hunt.returncode == 0, hunt.stdout + hunt.stderr

    trials = read_trials(database)
    assert [t["status"] for t in trials] == ["completed"] * 3
    for trial in trials:
        [objective] = [r["value"] for r in trial["results"] if r["type"] == "objective"]
        assert isinstance(objective, float) and 0.0 <= objective <= 1.0
    # Each trial keeps its log and checkpoint in its own working directory.
    trial_dirs = sorted((tmp_path / "trials").iterdir())
    assert len(trial_dirs) == 3
    for trial_dir in trial_dirs:
        assert "Epoch 0: " in (trial_dir / "train.log").read_text()
        assert (trial_dir / "checkpoint.pt").is_file()

    info = orion("info", "-n", "test-hunt", env=env)
    assert info.returncode == 0, info.stderr
    assert "test-hunt" in info.stdout and "completed: 3" in info.stdout.replace("trials completed", "completed")

    plot = orion("plot", "regret", "-n", "test-hunt", "-o", tmp_path / "regret.png", env=env, timeout=300)
    assert plot.returncode == 0, plot.stdout + plot.stderr
    png = (tmp_path / "regret.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_main_writes_the_same_results_file_as_orion_client(tmp_path):
    """main.py writes Oríon's results file itself (no `import orion.client` per trial): the same bytes."""
    files = {name: tmp_path / f"{name}.json" for name in ("orion", "main")}
    for path in files.values():
        path.write_text("")  # Oríon creates the file before it starts the trial; orion.client requires it.
    reporters = {
        "orion": "import main; from orion.client import report_objective; report_objective(0.3125, main.OBJECTIVE)",
        "main": "import main, trial_support; trial_support.report_objective(main.OBJECTIVE, 0.3125)",
    }
    for name, code in reporters.items():
        result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO_ROOT, capture_output=True,
                                text=True, env=clean_env(ORION_RESULTS_PATH=files[name]), timeout=300)
        assert result.returncode == 0, result.stderr
    assert files["main"].read_bytes() == files["orion"].read_bytes()


def test_info_of_an_unknown_experiment_is_one_error_line(tmp_path):
    env = clean_env(HOME=tmp_path, ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=tmp_path / "orion.pkl")
    hunt = orion("hunt", "-n", "other", "--max-trials", "1", "--working-dir", tmp_path / "trials",
                 "python", REPO_ROOT / "tests" / "standin_trial.py", "--learning-rate~loguniform(1e-5, 1)", env=env)
    assert hunt.returncode == 0, hunt.stdout + hunt.stderr
    info = orion("info", "-n", "does-not-exist", env=env)
    assert info.returncode == 1
    assert ("Error: No experiment with given name 'does-not-exist' and version '*' inside database, "
            "no view can be created.") in info.stderr.splitlines()
    assert "Traceback" not in info.stderr


def test_orion_list_names_the_experiments_there_are(tmp_path):
    """What the README says to run when `orion info -n NAME` knows no NAME."""
    env = clean_env(HOME=tmp_path, ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=tmp_path / "orion.pkl")
    orion("hunt", "-n", "other", "--max-trials", "1", "--working-dir", tmp_path / "trials",
          "python", REPO_ROOT / "tests" / "standin_trial.py", "--learning-rate~loguniform(1e-5, 1)", env=env)
    assert orion("list", env=env).stdout.split() == ["other-v1"]


# A trial whose objective is a loss (NaN once training diverges), with a model that trains in a
# blink: main.py's own main() otherwise.
LOSS_OBJECTIVE_TRIAL = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
import math, torch, main
main.OBJECTIVE = "validation loss"
main.objective = lambda metrics: metrics["val_loss"]
main.build_model = lambda args, data: torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(math.prod(data.input_shape), data.classes))
main.main()
"""


@pytest.mark.parametrize("algorithm, fidelity", [
    ("tpe: {seed: 1, n_initial_points: 2}", []),
    ("asha: {seed: 1, num_brackets: 1}", ["--epochs~fidelity(1, 4, base=2)"]),
])
def test_diverged_trials_complete_and_the_search_goes_on(data_dir, tmp_path, algorithm, fidelity):
    """Learning rates up to 1e30: most trials diverge (their loss objective is NaN). Each completes
    with its untrained model's loss, a finite value the algorithm learns from; none breaks, and the
    search reaches its budget (with TPE and with ASHA, whose rungs need every result)."""
    database, trial = tmp_path / "orion.pkl", tmp_path / "loss_objective_trial.py"
    trial.write_text(LOSS_OBJECTIVE_TRIAL)
    (tmp_path / "config.yml").write_text(
        f"experiment:\n  algorithm:\n    {algorithm}\n  max_trials: 5\n  max_broken: 1\n"
        f"storage:\n  database:\n    type: pickleddb\n    host: {database}\n")
    hunt = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "orion_tools", "hunt", "-n", "diverging", "--config",
         str(tmp_path / "config.yml"), "--working-dir", str(tmp_path / "trials"), sys.executable, str(trial),
         "--data-dir", str(data_dir), "--batch-size", "64", *(["--epochs", "1"] if not fidelity else fidelity),
         "--learning-rate~loguniform(1e-3, 1e30)"],
        env=clean_env(HOME=tmp_path, ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=database), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=600)
    assert hunt.returncode == 0, hunt.stdout[-3000:] + hunt.stderr[-3000:]
    trials = read_trials(database)
    assert [t["status"] for t in trials] == ["completed"] * 5
    reported = []
    for trial_doc in trials:
        [objective] = [r for r in trial_doc["results"] if r["type"] == "objective"]
        assert objective["name"] == "validation loss" and math.isfinite(objective["value"])
        reported.append(objective["value"])
    last_records = [read_metrics(path.parent)[-1] for path in (tmp_path / "trials").rglob("metrics.jsonl")]
    diverged = [r for r in last_records if r["diverged"]]
    assert diverged
    assert all(r["untrained_objective"] in reported for r in diverged)

"""README's "Make it yours" worked example, applied as written there to a copy of the project.

Another data set (one channel, 8x8 pixels, 5 classes, in a .npz file), a small CNN, and one new
hyperparameter that the model uses (--dropout), searched by Oríon: the README's new module and
its diff to main.py and job.sh. On the copy: a trial, a resume after SIGTERM, the dry run of the
search, and a bad value. If the README's example and the code drift apart, the diff no longer
applies, or what it builds fails here.
"""

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import README, REPO_ROOT, clean_env, read_metrics, read_trials


def worked_example() -> tuple[str, str, str]:
    """(the new module's name, its code, the diff), from the README's worked example."""
    section = README.read_text().split("### A worked example")[1].split("\n## ")[0]
    [module] = re.findall(r"```python\n(.*?)```", section, re.S)
    [diff] = re.findall(r"```diff\n(.*?)```", section, re.S)
    [name] = re.findall(r"^\+import (\w+) as dataset$", diff, re.M)
    return name, module, diff


def readme_sample_command() -> str:
    """The README's command that writes the example's data set where its module stages it from."""
    section = README.read_text().split("### A worked example")[1].split("\n## ")[0]
    [command] = re.findall(r"`uv run python (\w+\.py sample [^`]+)`", " ".join(section.split()))
    return command


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the project with the worked example applied; (its folder, the environment to run in)."""
    folder = tmp_path_factory.mktemp("make-it-yours")
    project = folder / "project"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for file in files:
        if (REPO_ROOT / file).is_file():
            (project / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / file, project / file)
    (project / ".venv").symlink_to(REPO_ROOT / ".venv")
    name, module, diff = worked_example()
    (project / f"{name}.py").write_text(module)
    applied = subprocess.run(["git", "apply", "--verbose", "-"], input=diff, cwd=project, capture_output=True,
                             text=True)
    assert applied.returncode == 0, f"README's diff does not apply to main.py and job.sh: {applied.stderr}"
    env = clean_env(HOME=folder / "home", SCRATCH=folder / "scratch", XDG_CONFIG_HOME=folder / "config")
    # As written in the README, `~` included (in this test's own HOME).
    sample = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {readme_sample_command()}"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr
    staged = subprocess.run([sys.executable, "orion_tools.py", "stage-data", "--module", f"{name}.py",
                             "--destination", str(folder / "data")], cwd=project, env=env, capture_output=True,
                            text=True, timeout=120)
    assert staged.returncode == 0, staged.stderr
    return project, env


def run_trial(project, env, *args, **kwargs) -> subprocess.CompletedProcess:
    data_dir = Path(env["HOME"]).parent / "data"
    return subprocess.run([sys.executable, "main.py", "--data-dir", str(data_dir), *map(str, args)], cwd=project,
                          env=env, capture_output=True, text=True, timeout=600, **kwargs)


TRIAL = ["--epochs", "12", "--batch-size", "16", "--learning-rate", "3e-3", "--dropout", "0.2"]


@pytest.fixture(scope="module")
def uninterrupted(project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_trial(*project, *TRIAL, "--checkpoint-dir", folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, folder


def test_a_trial_trains_on_the_new_data_and_model(uninterrupted):
    result, folder = uninterrupted
    assert "of shape (1, 8, 8), 5 classes" in result.stdout
    records = read_metrics(folder)
    assert len(records) == 12
    assert records[-1]["val_accuracy"] > 0.8  # 5 classes: chance is 0.2.


def test_resume_after_sigterm_reproduces_the_run(project, uninterrupted, tmp_path):
    folder, env = tmp_path / "trial", project[1]
    process = subprocess.Popen([sys.executable, "main.py", "--data-dir", str(Path(env["HOME"]).parent / "data"),
                                *TRIAL, "--checkpoint-dir", str(folder)], cwd=project[0], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (folder / "metrics.jsonl").exists() and time.monotonic() < deadline:  # An epoch done.
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert len(read_metrics(folder)) < 12  # Stopped early: the rest comes from the resumed run.
    resumed = run_trial(*project, *TRIAL, "--checkpoint-dir", folder)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming training at epoch" in resumed.stdout
    curve = lambda records: [(r["epoch"], r["train_loss"], r["val_loss"], r["val_accuracy"]) for r in records]  # noqa: E731
    assert curve(read_metrics(folder)) == curve(read_metrics(uninterrupted[1]))


def test_dry_run_of_the_search_searches_the_new_hyperparameter(project):
    folder, env = project
    result = subprocess.run(["bash", "job.sh", "--epochs", "1"], cwd=folder,
                            env={**env, "ORION_EXPERIMENT": "digits", "ORION_MAX_TRIALS": "2"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = read_trials(Path(env["SCRATCH"]) / "orion-example-dry-run" / "orion_db.pkl", "digits")
    assert [t["status"] for t in trials] == ["completed", "completed"]
    for trial in trials:
        [dropout] = [p["value"] for p in trial["params"] if p["name"] == "/dropout"]
        assert 0 <= dropout <= 0.5


def test_a_bad_value_of_the_new_hyperparameter_is_one_error_line(project):
    result = run_trial(*project, "--dropout", "1.5")
    assert result.returncode == 2
    assert result.stderr == "main.py: error: argument --dropout: must be a number in [0, 1], got 1.5 (see --help)\n"


def test_a_prior_wider_than_the_hyperparameter_allows_is_refused_before_any_trial(project, tmp_path):
    folder, env = project
    job = (folder / "job.sh").read_text().replace("--dropout~'uniform(0, 0.5)'", "--dropout~'uniform(0, 1.5)'")
    assert "uniform(0, 1.5)" in job
    (tmp_path / "job.sh").write_text(job)
    result = subprocess.run(["bash", tmp_path / "job.sh", "--epochs", "1"], cwd=folder,
                            env={**env, "SCRATCH": str(tmp_path / "scratch")}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert ("error: the prior --dropout~'uniform(0, 1.5)' in job.sh reaches 1.5, which main.py refuses "
            "(argument --dropout: must be a number in [0, 1], got 1.5)") in result.stderr
    assert not (tmp_path / "scratch" / "orion-example-dry-run" / "orion_db.pkl").exists()

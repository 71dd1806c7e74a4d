"""The worked examples of docs/make-it-yours.md, each applied as written there to a copy of the project.

Three kinds of research: digits (small images held on the device, a small CNN, --dropout), a
regression on a CSV of float features (an MLP, a Huber loss whose --huber-delta is searched, the
validation MSE as the objective) and a folder of photos streamed from disk by torchvision's
ImageFolder (its own validation split, --label-smoothing in the loss). For each: the page's new
module and its diff to main.py and job.sh, applied to a copy; then a trial, a resume after SIGTERM,
the dry run of the search, a bad value, a prior too wide, and the pipeline tests
(tests/test_main.py), unchanged, on the new data. If the page's examples and the code drift
apart, the diff no longer applies, or what it builds fails here.
"""

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DOCS, REPO_ROOT, clean_env, learning_curve, read_metrics, read_trials


@dataclass
class Example:
    heading: str  # The start of its heading in docs/make-it-yours.md, after "## Worked example: ".
    trial: list  # main.py's arguments for a short trial that learns.
    shape: str  # The Data: line's description of the inputs and targets.
    new_argument: str  # The hyperparameter it adds, which Oríon searches.
    bad_value: str
    refusal: str
    prior: str  # As in job.sh's priors.
    wider_prior: str


EXAMPLES = {
    "digits": Example("digits", ["--epochs", "12", "--batch-size", "16", "--learning-rate", "3e-3", "--dropout", "0.2"],
                      "inputs of shape (1, 8, 8) uint8, 5 classes; held on the cpu", "dropout", "1.5",
                      "must be a number in [0, 1], got 1.5", "uniform(0, 0.5)", "uniform(0, 1.5)"),
    "diabetes": Example("a regression", ["--epochs", "8", "--learning-rate", "3e-3", "--huber-delta", "2"],
                        "inputs of shape (10,) float32, float targets of shape (); held on the cpu", "huber-delta",
                        "0", "must be a positive number, got 0", "loguniform(0.1, 10)", "uniform(-1, 10)"),
    "photos": Example("a folder of photos", ["--epochs", "3", "--batch-size", "16", "--augment",
                                             "--label-smoothing", "0.1"],
                      "inputs of shape (3, 48, 48) uint8, 3 classes; streamed from disk by 2 DataLoader worker(s)",
                      "label-smoothing", "-0.1", "must be a number in [0, 1], got -0.1", "uniform(0, 0.2)",
                      "uniform(0, 1.2)"),
}


def worked_example(heading: str) -> tuple[str, str, str, str]:
    """(the new module's name, its code, the diff, the sample command), from docs/make-it-yours.md's worked example."""
    section = (DOCS / "make-it-yours.md").read_text().split(f"## Worked example: {heading}")[1].split("\n## ")[0]
    [module] = re.findall(r"```python\n(.*?)```", section, re.S)
    [diff] = re.findall(r"```diff\n(.*?)```", section, re.S)
    [name] = re.findall(r"^\+import (\w+) as dataset$", diff, re.M)
    [command] = re.findall(r"`uv run python (\w+\.py sample [^`]+)`", " ".join(section.split()))
    return name, module, diff, command


@pytest.fixture(scope="module", params=list(EXAMPLES))
def project(request, tmp_path_factory) -> tuple[Path, dict, str, Example]:
    """A copy of the project with a worked example applied: (its folder, the environment, the module, the example)."""
    example = EXAMPLES[request.param]
    folder = tmp_path_factory.mktemp(f"make-it-yours-{request.param}")
    project = folder / "project"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for file in files:
        if (REPO_ROOT / file).is_file():
            (project / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / file, project / file)
    (project / ".venv").symlink_to(REPO_ROOT / ".venv")
    name, module, diff, command = worked_example(example.heading)
    assert name == request.param
    (project / f"{name}.py").write_text(module)
    applied = subprocess.run(["git", "apply", "--verbose", "-"], input=diff, cwd=project, capture_output=True,
                             text=True)
    assert applied.returncode == 0, f"the page's diff does not apply to main.py and job.sh: {applied.stderr}"
    env = clean_env(HOME=folder / "home", SCRATCH=folder / "scratch", XDG_CONFIG_HOME=folder / "config")
    # As written there, `~` included (in this test's own HOME).
    sample = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {command}"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    staged = subprocess.run([sys.executable, "-m", "orion_tools", "stage-data", "--module", f"{name}.py",
                             "--destination", str(folder / "data")], cwd=project, env=env, capture_output=True,
                            text=True, timeout=300)
    assert staged.returncode == 0, staged.stderr
    return project, env, name, example


def run_trial(project, env, *args, **kwargs) -> subprocess.CompletedProcess:
    data_dir = Path(env["HOME"]).parent / "data"
    return subprocess.run([sys.executable, "main.py", "--data-dir", str(data_dir), "--loader-workers", "2",
                           *map(str, args)], cwd=project, env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run_trial(project[0], project[1], *project[3].trial, "--checkpoint-dir", folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, folder


def test_a_trial_trains_on_the_new_data_and_model(project, uninterrupted):
    result, folder = uninterrupted
    assert project[3].shape in result.stdout
    records = read_metrics(folder)
    assert len(records) == int(project[3].trial[1])
    # Oríon minimizes the objective: well below the untrained model's.
    assert records[-1]["objective"] < 0.7 * records[-1]["untrained_objective"]


def test_resume_after_sigterm_reproduces_the_run(project, uninterrupted, tmp_path):
    folder, (project_dir, env, _, example) = tmp_path / "trial", project
    process = subprocess.Popen([sys.executable, "main.py", "--data-dir", str(Path(env["HOME"]).parent / "data"),
                                "--loader-workers", "2", *example.trial, "--checkpoint-dir", str(folder)],
                               cwd=project_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (folder / "metrics.jsonl").exists() and time.monotonic() < deadline:  # An epoch done.
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert len(read_metrics(folder)) < int(example.trial[1])  # Stopped early: the rest comes from the resumed run.
    resumed = run_trial(project_dir, env, *example.trial, "--checkpoint-dir", folder)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Resuming training at epoch" in resumed.stdout
    assert learning_curve(folder) == learning_curve(uninterrupted[1])


def test_dry_run_of_the_search_searches_the_new_hyperparameter(project):
    folder, env, name, example = project
    result = subprocess.run(["bash", "job.sh", "--epochs", "1"], cwd=folder,
                            env={**env, "ORION_EXPERIMENT": name, "ORION_MAX_TRIALS": "2"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = read_trials(Path(env["SCRATCH"]) / "orion-example-dry-run" / "orion_db.pkl", name)
    assert [t["status"] for t in trials] == ["completed", "completed"]
    low, high = map(float, re.findall(r"[\d.]+", example.prior)[:2])
    for trial in trials:
        [value] = [p["value"] for p in trial["params"] if p["name"] == f"/{example.new_argument}"]
        assert low <= value <= high
        [objective] = [r for r in trial["results"] if r["type"] == "objective"]
        assert objective["name"] == subprocess.run(
            [sys.executable, "-c", "import main; print(main.OBJECTIVE)"], cwd=folder, env=env, capture_output=True,
            text=True).stdout.strip()


def test_a_bad_value_of_the_new_hyperparameter_is_one_error_line(project):
    folder, env, _, example = project
    result = run_trial(folder, env, f"--{example.new_argument}={example.bad_value}")
    assert result.returncode == 2
    assert result.stderr == f"main.py: error: argument --{example.new_argument}: {example.refusal} (see --help)\n"


def test_a_prior_wider_than_the_hyperparameter_allows_is_refused_before_any_trial(project, tmp_path):
    folder, env, _, example = project
    old, new = f"--{example.new_argument}~'{example.prior}'", f"--{example.new_argument}~'{example.wider_prior}'"
    job = (folder / "job.sh").read_text().replace(old, new)
    assert new in job
    (tmp_path / "job.sh").write_text(job)
    result = subprocess.run(["bash", tmp_path / "job.sh", "--epochs", "1"], cwd=folder,
                            env={**env, "SCRATCH": str(tmp_path / "scratch")}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert f"error: the prior {new} in job.sh reaches " in result.stderr, result.stderr
    assert not (tmp_path / "scratch" / "orion-example-dry-run" / "orion_db.pkl").exists()


def test_the_pipeline_tests_pass_unchanged_on_the_new_data(project):
    folder, env, _, _ = project
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                             "tests/test_main.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

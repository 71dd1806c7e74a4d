"""main.py as a trial: the data on the device, the command line, training and reporting.

Nothing here knows CIFAR-10: the data come from main.py's data set module (conftest.data_dir),
so these tests keep working when main.py trains on other data (tests/test_cifar10.py does not).
"""

import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import main
from conftest import EPOCH_LINE, OBJECTIVE_LINE, REPO_ROOT, clean_env, read_metrics, readme_commands, run_main
from trial_support import VALIDATION_FRACTION, Trial


def load_data(data_dir, *argv):
    """What main() does first: the data set's load(), checked, split, on the CPU."""
    return Trial(main.parse_args(["--data-dir", str(data_dir), *argv])).load_data(main.dataset.load)


# --- The data on the device ----------------------------------------------------------------


def test_split_is_90_10_and_loses_no_image(data_dir):
    loaded, data = main.dataset.load(data_dir), load_data(data_dir)
    n_valid = int(VALIDATION_FRACTION * len(loaded["images"]))
    assert (len(data.train_images), len(data.valid_images)) == (len(loaded["images"]) - n_valid, n_valid)
    assert (data.train_images.dtype, data.train_labels.dtype) == (torch.uint8, torch.int64)
    assert data.train_images.shape[1:] == loaded["images"].shape[1:]
    rows = lambda x: sorted(bytes(r) for r in x.reshape(len(x), -1).numpy())  # noqa: E731
    assert rows(torch.cat([data.train_images, data.valid_images])) == rows(torch.from_numpy(loaded["images"]))


def test_split_is_fixed_and_independent_of_the_seed(data_dir):
    torch.manual_seed(1)
    first = load_data(data_dir, "--seed", "1")
    torch.manual_seed(2)
    second = load_data(data_dir, "--seed", "2")
    for name in ("train_images", "train_labels", "valid_images", "valid_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_normalization_uses_the_data_sets_statistics(data_dir):
    loaded, data = main.dataset.load(data_dir), load_data(data_dir)
    channel = torch.from_numpy(loaded["images"][:, :1]).float()
    expected = (channel - loaded["mean"][0]) / loaded["std"][0]
    assert torch.allclose(data.normalize(torch.from_numpy(loaded["images"]))[:, :1], expected)


@pytest.mark.parametrize("change, expected", [
    (lambda d: {**d, "images": d["images"].astype("float32")}, "are float32 images of shape"),
    (lambda d: {**d, "images": d["images"].transpose(0, 2, 3, 1)}, "channel(s) (shape"),  # Channels last.
    (lambda d: {**d, "mean": (0.0,) * (len(d["mean"]) + 1)}, "channel(s) (shape"),
    (lambda d: {**d, "std": (0.0,) * len(d["std"])}, "have a std of 0.0 in the data set's std"),
    (lambda d: {**d, "labels": d["labels"] + d["classes"]}, "classes need labels in 0..{classes}"),
    (lambda d: {k: v for k, v in d.items() if k != "classes"}, "the data set's load() returned no 'classes'"),
    (lambda d: tuple(d.values()), "the data set's load() returned a tuple: it must return a dict"),
])
def test_what_the_data_set_returns_is_checked_in_one_line(data_dir, monkeypatch, capsys, change, expected):
    loaded = main.dataset.load(data_dir)
    with pytest.raises(SystemExit) as exit_info:
        Trial(main.parse_args(["--data-dir", str(data_dir)])).load_data(lambda folder: change(loaded))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert expected.format(classes=loaded["classes"] - 1) in message


# --- Command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size: must be an integer >= 2 (BatchNorm needs two images), got 0"),
        (["--learning-rate", "0"], "--learning-rate: must be a positive number, got 0"),
        (["--learning-rate=-1e-3"], "--learning-rate: must be a positive number, got -1e-3"),
        (["--learning-rate", "nan"], "--learning-rate: must be a positive number, got nan"),
        (["--weight-decay", "-1"], "--weight-decay: must be zero or a positive number, got -1"),
        (["--epochs", "ten"], "--epochs: invalid integer value: 'ten'"),
        (["--batch-size", "1"], "--batch-size: must be an integer >= 2 (BatchNorm needs two images), got 1"),
        (["--seed", "-1"], "--seed: must be an integer >= 0 and <= 4294967295, got -1"),
        (["--fooo", "1"], "unrecognized arguments: --fooo 1"),
        (["--seed", "4294967296"], "--seed: must be an integer >= 0 and <= 4294967295, got 4294967296"),
        (["--learning-rate", "abc"], "--learning-rate: invalid number value: 'abc'"),
        (["--learning", "0.1"], "unrecognized arguments: --learning 0.1"),  # No abbreviations.
    ],
)
def test_bad_hyperparameters_give_one_error_line(monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err


def test_bad_argument_error_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["main.py", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main.parse_args()
    assert capsys.readouterr().err.count("\n") == 1


def test_data_dir_defaults_to_slurm_tmpdir(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path))
    assert main.parse_args().data_dir == tmp_path / "data"
    monkeypatch.delenv("SLURM_TMPDIR")
    assert str(main.parse_args().data_dir) == "data"


def test_missing_data_is_one_line_without_traceback(tmp_path):
    result = run_main("--data-dir", tmp_path, "--epochs", "1")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0  # One line: no traceback.
    assert result.stderr.startswith("error: ") and str(tmp_path) in result.stderr


def test_batch_size_larger_than_the_data_is_refused(data_dir):
    n_train = len(load_data(data_dir).train_images)
    result = run_main("--data-dir", data_dir, "--batch-size", n_train + 1)
    assert result.returncode == 1
    assert result.stderr == (f"error: --batch-size {n_train + 1} is larger than the {n_train} training images: "
                             "pass a smaller one\n")


# --- Training and reporting -----------------------------------------------------------




@pytest.fixture(scope="module")
def one_cpu_epoch(data_dir, tmp_path_factory):
    """One epoch on the CPU, as a trial: (its output, its metrics records, its results file's content)."""
    tmp_path = tmp_path_factory.mktemp("one-epoch")
    result = run_main(
        "--data-dir", data_dir, "--epochs", "1", "--batch-size", "32", "--learning-rate", "1e-3",
        "--checkpoint-dir", tmp_path / "trial", env=clean_env(ORION_RESULTS_PATH=tmp_path / "results.json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, read_metrics(tmp_path / "trial"), json.loads((tmp_path / "results.json").read_text())


def test_cpu_run_says_it_has_no_gpu(one_cpu_epoch):
    output, _, _ = one_cpu_epoch
    assert "No GPU found: training on the CPU" in output


def test_one_cpu_epoch_beats_chance(one_cpu_epoch, data_dir):
    _, [metrics], _ = one_cpu_epoch
    assert metrics["val_accuracy"] > 3 / load_data(data_dir).classes  # Three times chance.


def test_metrics_file_has_one_record_per_epoch_with_what_plots_need(one_cpu_epoch):
    _, records, _ = one_cpu_epoch
    assert [r["epoch"] for r in records] == [0]
    expected = {"train_loss", "val_loss", "val_accuracy", "train_seconds", "val_seconds", "images_per_second",
                "trained_images", "train_images", "device"}
    assert expected <= set(records[0])


def test_metrics_agree_with_the_epoch_line(one_cpu_epoch):
    output, [metrics], _ = one_cpu_epoch
    [(epoch, val_loss, accuracy)] = EPOCH_LINE.findall(output)
    assert (int(epoch), val_loss, accuracy) == (0, f"{metrics['val_loss']:.3f}", f"{metrics['val_accuracy']:.2%}"[:-1])


def test_reports_one_minus_accuracy_in_orions_results_file(one_cpu_epoch):
    _, [metrics], results = one_cpu_epoch
    assert results == [{"name": main.OBJECTIVE, "type": "objective", "value": 1 - metrics["val_accuracy"]}]


def test_reported_objective_is_a_plain_float(one_cpu_epoch):
    _, _, [result] = one_cpu_epoch
    assert type(result["value"]) is float


def test_diverged_run_stops_early_and_still_reports_its_accuracy(data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    result = run_main(
        "--data-dir", data_dir, "--epochs", "3", "--learning-rate", "1e30", "--checkpoint-dir", tmp_path / "trial",
        env=clean_env(ORION_RESULTS_PATH=results_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Training diverged in epoch 0" in result.stdout
    assert [(r["epoch"], r["diverged"]) for r in read_metrics(tmp_path / "trial")] == [(0, True)]
    [objective] = json.loads(results_path.read_text())
    assert 0.0 <= objective["value"] <= 1.0


def test_readme_commands_for_main_py_work_as_written(tmp_path):
    commands = readme_commands("uv run python")
    assert [c.split()[3] for c in commands] == [f"{main.dataset.__name__}.py", "main.py"]
    data = REPO_ROOT / "data"
    owned = not data.exists()  # Never touch a data/ folder of the user's: use a temporary one.
    try:
        outputs = []
        for command in commands:
            argv = [str(tmp_path / "data") if a == "data" and not owned else a for a in shlex.split(command)]
            result = subprocess.run(argv, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
            outputs.append(result.stdout)
        assert OBJECTIVE_LINE.search(outputs[-1])
    finally:
        if owned:
            shutil.rmtree(data, ignore_errors=True)


def test_a_crash_is_readable_in_a_slurm_output_file(data_dir, tmp_path):
    """An uncaught error's traceback, as a Slurm output file gets it (not a terminal): whole lines,
    none wrapped mid-path, on the output and in the trial's train.log."""
    message = "a bug in the training step, at /a/path/" + "deep/" * 40 + "file.py"
    program = ("import main\n"
               "def train_step(*args, **kwargs):\n"
               f"    raise RuntimeError({message!r})\n"
               "main.train_step = train_step\n"
               "main.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--data-dir", str(data_dir), "--epochs", "1",
                             "--checkpoint-dir", str(tmp_path)], env=clean_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert f"RuntimeError: {message}\n" in result.stdout
    assert "Traceback (most recent call last):\n" in result.stdout
    assert f"RuntimeError: {message}\n" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("model, expected", [
    ("torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.train_images[0].numel(), data.classes + 1))",
     "error: build_model's model gives outputs of shape ({classes_plus_one},) per image, and the data set has "
     "{classes} classes: make its last layer give data.classes values"),
    ("torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, data.classes))",
     "error: build_model's model cannot take the data's images of shape"),
])
def test_a_model_that_does_not_fit_the_data_is_one_error_line(data_dir, tmp_path, model, expected):
    program = ("import torch, main\n"
               f"main.build_model = lambda args, data: {model}\n"
               "main.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--data-dir", str(data_dir), "--epochs", "1"],
                            env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    classes = load_data(data_dir).classes
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # One line: no traceback.
    assert result.stderr.startswith(expected.format(classes=classes, classes_plus_one=classes + 1))

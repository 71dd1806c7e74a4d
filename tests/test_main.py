"""main.py as a trial: the data on the device, the command line, training and reporting.

Nothing here knows the data set, the model or the objective: the data come from main.py's data set
module (conftest.data_dir), whatever its form (held on the device or streamed) and its targets
(classes or floats); the objective is main.py's. These tests pass unchanged on each of the README's
worked examples (tests/test_make_it_yours.py runs them there). Checks of the data contract itself
use data of their own: tests/test_trial_data.py.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

import main
from conftest import EPOCH_LINE, OBJECTIVE_LINE, REPO_ROOT, clean_env, read_metrics, run_main
from trial_support import VALIDATION_FRACTION, Trial


def load_data(data_dir, *argv):
    """What main() does first: the data set's load(), checked, split, ready on the CPU."""
    return Trial(main.parse_args(["--data-dir", str(data_dir), *argv])).load_data(main.dataset.load)


def examples(data, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every example of a split as (inputs, targets), in the order it serves them (train: unshuffled)."""
    if split == "valid":
        batches = list(data.valid_batches())
    else:
        batches = list(data.train_batches(torch.arange(data.train_size), 0))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# --- The data on the device ----------------------------------------------------------------


def test_split_keeps_every_example_once(data_dir):
    loaded, data = main.dataset.load(data_dir), load_data(data_dir)
    if "dataset" in loaded:
        total = len(loaded["dataset"]) + len(loaded.get("valid_dataset", []))
    else:
        total = len(loaded["inputs"]) + len(loaded.get("valid_inputs", []))
    assert data.train_size + data.valid_size == total
    if "valid_inputs" not in loaded and "valid_dataset" not in loaded:
        assert data.valid_size == int(VALIDATION_FRACTION * total)
    train_inputs, train_targets = examples(data, "train")
    valid_inputs, valid_targets = examples(data, "valid")
    assert (len(train_inputs), len(valid_inputs)) == (data.train_size, data.valid_size)
    assert tuple(train_inputs.shape[1:]) == data.input_shape and train_inputs.dtype == data.input_dtype
    assert train_targets.dtype == (torch.int64 if data.classes else torch.float32)  # Floats never truncated.
    if "inputs" in loaded and "valid_inputs" not in loaded:  # The fixed split loses and repeats nothing.
        rows = lambda x: sorted(bytes(r) for r in x.reshape(len(x), -1).contiguous().numpy())  # noqa: E731
        assert rows(torch.cat([train_inputs, valid_inputs])) == rows(torch.as_tensor(loaded["inputs"]))


def test_split_is_fixed_and_independent_of_the_seed(data_dir):
    torch.manual_seed(1)
    first = load_data(data_dir, "--seed", "1")
    torch.manual_seed(2)
    second = load_data(data_dir, "--seed", "2")
    for split in ("train", "valid"):
        for a, b in zip(examples(first, split), examples(second, split)):
            assert torch.equal(a, b)


def test_inputs_are_prepared_with_the_data_sets_statistics(data_dir):
    loaded, data = main.dataset.load(data_dir), load_data(data_dir)
    inputs, _ = examples(data, "valid")
    prepared = data.prepare(inputs)
    if "mean" not in loaded:
        assert prepared is inputs  # Token ids stay integers.
        return
    first_channel = inputs[:, :1].float()
    mean, std = float(torch.as_tensor(loaded["mean"]).reshape(-1)[0]), float(torch.as_tensor(loaded["std"]).reshape(-1)[0])
    assert prepared.dtype == torch.float32
    assert torch.allclose(prepared[:, :1], (first_channel - mean) / std, atol=1e-5)


# --- Command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size: must be an integer >= 2"),
        (["--learning-rate", "0"], "--learning-rate: must be a positive number, got 0"),
        (["--learning-rate=-1e-3"], "--learning-rate: must be a positive number, got -1e-3"),
        (["--learning-rate", "nan"], "--learning-rate: must be a positive number, got nan"),
        (["--weight-decay", "-1"], "--weight-decay: must be zero or a positive number, got -1"),
        (["--epochs", "ten"], "--epochs: invalid integer value: 'ten'"),
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
    n_train = load_data(data_dir).train_size
    result = run_main("--data-dir", data_dir, "--batch-size", n_train + 1)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the data that ") and result.stderr.count("\n") == 1
    assert result.stderr.endswith(f" hold {n_train} training examples, fewer than --batch-size {n_train + 1}: "
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


def test_one_cpu_epoch_improves_on_the_untrained_model(one_cpu_epoch):
    _, [metrics], _ = one_cpu_epoch
    assert metrics["objective"] < metrics["untrained_objective"]  # Oríon minimizes it.


def test_metrics_file_has_one_record_per_epoch_with_what_plots_need(one_cpu_epoch):
    _, records, _ = one_cpu_epoch
    assert [r["epoch"] for r in records] == [0]
    expected = {"train_loss", "objective", "untrained_objective", "train_seconds", "val_seconds",
                "examples_per_second", "trained_examples", "train_examples", "device", "streamed"}
    assert expected <= set(records[0])


def test_metrics_agree_with_the_epoch_line(one_cpu_epoch):
    output, [record], _ = one_cpu_epoch
    [(epoch, metrics, name, objective)] = EPOCH_LINE.findall(output)
    assert (int(epoch), name, objective) == (0, main.OBJECTIVE, f"{record['objective']:.4g}")
    for pair in metrics.split(", "):
        metric, value = pair.split(": ")
        assert value == f"{record[metric]:.4g}"


def test_reports_the_objective_in_orions_results_file(one_cpu_epoch):
    _, [metrics], results = one_cpu_epoch
    assert results == [{"name": main.OBJECTIVE, "type": "objective", "value": metrics["objective"]}]


def test_reported_objective_is_a_plain_float(one_cpu_epoch):
    _, _, [result] = one_cpu_epoch
    assert type(result["value"]) is float


def test_diverged_run_stops_early_and_reports_its_untrained_objective(data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    result = run_main(
        "--data-dir", data_dir, "--epochs", "3", "--learning-rate", "1e30", "--checkpoint-dir", tmp_path / "trial",
        env=clean_env(ORION_RESULTS_PATH=results_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Training diverged in epoch 0" in result.stdout
    [record] = read_metrics(tmp_path / "trial")
    assert (record["epoch"], record["diverged"]) == (0, True)
    # Its objective if that is still a number (an accuracy of garbage), else its untrained model's.
    expected = record["objective"] if record["objective"] is not None else record["untrained_objective"]
    [objective] = json.loads(results_path.read_text())
    assert objective == {"name": main.OBJECTIVE, "type": "objective", "value": expected}
    assert math.isfinite(expected)


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
    ("torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(data.input_shape), (data.classes or 1) + 1))",
     "error: build_model's model gives outputs of shape ({wrong},) per example, and the data set"),
    ("torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, data.classes or 1))",
     "error: build_model's model cannot take the data's inputs of shape"),
])
def test_a_model_that_does_not_fit_the_data_is_one_error_line(data_dir, tmp_path, model, expected):
    program = ("import math, torch, main\n"
               f"main.build_model = lambda args, data: {model}\n"
               "main.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--data-dir", str(data_dir), "--epochs", "1"],
                            env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    classes = load_data(data_dir).classes
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr  # One line: no traceback.
    assert result.stderr.startswith(expected.format(wrong=(classes or 1) + 1))

"""main.py: data loading and validation, the split, the command line, training and reporting."""

import json
import multiprocessing
import pickle
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
from cifar10_lookalike import dumps_py2, write_cifar10_archive
from conftest import EPOCH_LINE, IMAGES_PER_BATCH, REPO_ROOT, clean_env, read_metrics, readme_commands, run_main

N_IMAGES = 5 * IMAGES_PER_BATCH
N_VALID = N_IMAGES // 10


# --- Loading the official format ------------------------------------------------------


def test_loads_official_format_and_splits_90_10(cifar_data_dir):
    train_x, train_y, valid_x, valid_y = main.load_train_and_validation(cifar_data_dir, torch.device("cpu"))
    assert train_x.shape == (N_IMAGES - N_VALID, 3, 32, 32)
    assert valid_x.shape == (N_VALID, 3, 32, 32)
    assert (train_x.dtype, train_y.dtype) == (torch.uint8, torch.int64)
    assert (len(train_y), len(valid_y)) == (len(train_x), len(valid_x))
    assert set(train_y.tolist()) <= set(range(10))
    # The split is a partition of the five training batches: no image lost or duplicated.
    raw = np.concatenate([main.load_batch_file(cifar_data_dir / "cifar-10-batches-py" / f"data_batch_{i}")[0]
                          for i in range(1, 6)])
    rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}  # noqa: E731
    assert rows(train_x) | rows(valid_x) == {bytes(r) for r in raw.reshape(len(raw), -1)}


def test_split_is_fixed_and_independent_of_the_seed(cifar_data_dir):
    torch.manual_seed(1)
    first = main.load_train_and_validation(cifar_data_dir, torch.device("cpu"))
    torch.manual_seed(2)
    second = main.load_train_and_validation(cifar_data_dir, torch.device("cpu"))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_extracts_the_archive_once_even_with_concurrent_readers(tmp_path):
    write_cifar10_archive(tmp_path, images_per_batch=20)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        folders = pool.map(main.find_or_extract_cifar10, [tmp_path] * 4)
    assert set(folders) == {tmp_path / "cifar-10-batches-py"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert len(main.load_batch_file(tmp_path / "cifar-10-batches-py" / "data_batch_5")[0]) == 20


def expect_data_error(data_dir, *fragments):
    with pytest.raises(main.DataError) as error:
        main.load_train_and_validation(data_dir, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.fixture
def data_copy(cifar_data_dir, tmp_path):
    shutil.copytree(cifar_data_dir, tmp_path / "data")
    return tmp_path / "data"


def test_missing_data_names_the_folder_and_what_to_do(tmp_path):
    expect_data_error(tmp_path, str(tmp_path), "cifar-10-python.tar.gz", "--data-dir")


def test_missing_batch_file(data_copy):
    (data_copy / "cifar-10-batches-py" / "data_batch_3").unlink()
    expect_data_error(data_copy, "data_batch_3", "missing")


def test_truncated_batch_file(data_copy):
    path = data_copy / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    expect_data_error(data_copy, str(path), "truncated or corrupt")


def test_truncated_archive(tmp_path):
    archive = write_cifar10_archive(tmp_path, images_per_batch=20)
    archive.write_bytes(archive.read_bytes()[:3000])
    expect_data_error(tmp_path, str(archive), "truncated or corrupt")
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]  # No half-extracted folder.


@pytest.mark.parametrize(
    "bad_batch, expected",
    [
        ({b"data": np.zeros((10, 3072), np.float32), b"labels": [0] * 10}, "uint8"),
        ({b"data": np.zeros((10, 1024), np.uint8), b"labels": [0] * 10}, "(N, 3072)"),
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [10] * 10}, "labels in 0..9"),
        ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, "10 integer labels"),
        ({b"data": None, b"labels": [0] * 10}, "expected uint8 images"),
        ({b"labels": [0] * 10}, "truncated or corrupt (KeyError"),
    ],
)
def test_invalid_contents_are_refused(data_copy, bad_batch, expected):
    (data_copy / "cifar-10-batches-py" / "data_batch_1").write_bytes(dumps_py2(bad_batch))
    expect_data_error(data_copy, "data_batch_1", expected)


def test_python3_pickles_with_str_keys_load_too(data_copy):
    path = data_copy / "cifar-10-batches-py" / "data_batch_1"
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    path.write_bytes(pickle.dumps(batch))
    images, labels = main.load_batch_file(path)
    assert images.shape == (IMAGES_PER_BATCH, 3, 32, 32)
    assert labels.tolist() == batch["labels"]


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


def test_bad_data_is_one_line_without_traceback(tmp_path):
    result = run_main("--data-dir", tmp_path, "--epochs", "1")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0  # One line: no traceback.
    assert result.stderr.startswith(f"error: CIFAR-10 not found in {tmp_path}")


def test_batch_size_larger_than_the_data_is_refused(cifar_data_dir):
    result = run_main("--data-dir", cifar_data_dir, "--batch-size", "1000")
    assert result.returncode == 1
    assert result.stderr == "error: --batch-size 1000 is larger than the 450 training images: pass a smaller one\n"


# --- Training and reporting -----------------------------------------------------------


def test_augment_crops_and_flips_on_the_device():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augmented = main.augment(images)
    assert (augmented.shape, augmented.dtype) == (images.shape, torch.uint8)
    # Each output is the input shifted by at most 4 px (zero fill), possibly flipped.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image, out in zip(padded, augmented):
        candidates = [image[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(2)) for c in candidates)
    assert not torch.equal(augmented, images)


@pytest.fixture(scope="module")
def one_cpu_epoch(cifar_data_dir, tmp_path_factory):
    """One epoch on the CPU, as a trial: (its output, its metrics records, its results file's content)."""
    tmp_path = tmp_path_factory.mktemp("one-epoch")
    result = run_main(
        "--data-dir", cifar_data_dir, "--epochs", "1", "--batch-size", "32", "--learning-rate", "1e-3",
        "--checkpoint-dir", tmp_path / "trial", env=clean_env(ORION_RESULTS_PATH=tmp_path / "results.json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, read_metrics(tmp_path / "trial"), json.loads((tmp_path / "results.json").read_text())


def test_cpu_run_says_it_has_no_gpu(one_cpu_epoch):
    output, _, _ = one_cpu_epoch
    assert "No GPU found: training on the CPU" in output


def test_one_cpu_epoch_beats_chance(one_cpu_epoch):
    _, [metrics], _ = one_cpu_epoch
    assert metrics["val_accuracy"] > 0.3  # Chance is 0.1.


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
    assert results == [{"name": "objective", "type": "objective", "value": 1 - metrics["val_accuracy"]}]


def test_reported_objective_is_a_plain_float(one_cpu_epoch):
    _, _, [result] = one_cpu_epoch
    assert type(result["value"]) is float


def test_diverged_run_stops_early_and_still_reports_its_accuracy(cifar_data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    result = run_main(
        "--data-dir", cifar_data_dir, "--epochs", "3", "--learning-rate", "1e30", "--checkpoint-dir", tmp_path / "trial",
        env=clean_env(ORION_RESULTS_PATH=results_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Training diverged in epoch 0" in result.stdout
    assert [(r["epoch"], r["diverged"]) for r in read_metrics(tmp_path / "trial")] == [(0, True)]
    [objective] = json.loads(results_path.read_text())
    assert 0.0 <= objective["value"] <= 1.0


def test_readme_commands_for_main_py_work_as_written(tmp_path):
    commands = readme_commands("uv run python")
    assert [c.split()[3] for c in commands] == ["tests/cifar10_lookalike.py", "main.py"]
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
        assert "Objective (1 - validation accuracy)" in outputs[-1]
    finally:
        if owned:
            shutil.rmtree(data, ignore_errors=True)

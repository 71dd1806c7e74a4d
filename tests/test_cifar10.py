"""cifar10.py, the data set's own tests: its official format, its checks, staging, augmentation.

The only tests that know CIFAR-10: a module of your own data set gets tests like these.
"""

import multiprocessing
import pickle
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cifar10
from cifar10_lookalike import dumps_py2, write_cifar10_archive, write_cifar10_lookalike
from conftest import OBJECTIVE_LINE, REPO_ROOT, clean_env, orion_tools_listing_heavy_imports, readme_commands

IMAGES_PER_BATCH = 100


@pytest.fixture(scope="module")
def batches_dir(tmp_path_factory):
    return write_cifar10_lookalike(tmp_path_factory.mktemp("cifar10"), images_per_batch=IMAGES_PER_BATCH).parent


@pytest.fixture
def data_copy(batches_dir, tmp_path):
    shutil.copytree(batches_dir, tmp_path / "data")
    return tmp_path / "data"


def test_loads_the_five_training_batches_of_the_official_format(batches_dir):
    loaded = cifar10.load(batches_dir)
    assert loaded["inputs"].shape == (5 * IMAGES_PER_BATCH, 3, 32, 32)
    assert (loaded["inputs"].dtype, loaded["targets"].dtype) == (np.uint8, np.int64)
    assert set(loaded["targets"].tolist()) <= set(range(10))
    assert (loaded["classes"], len(loaded["mean"]), len(loaded["std"])) == (10, 3, 3)
    raw = np.concatenate([cifar10.load_batch_file(batches_dir / "cifar-10-batches-py" / f"data_batch_{i}")[0]
                          for i in range(1, 6)])
    assert np.array_equal(loaded["inputs"], raw)  # test_batch is not among them.


def test_extracts_the_archive_once_even_with_concurrent_readers(tmp_path):
    write_cifar10_archive(tmp_path, images_per_batch=20)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        folders = pool.map(cifar10.find_or_extract, [tmp_path] * 4)
    assert set(folders) == {tmp_path / "cifar-10-batches-py"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert len(cifar10.load_batch_file(tmp_path / "cifar-10-batches-py" / "data_batch_5")[0]) == 20


def expect_data_error(data_dir, *fragments):
    with pytest.raises(cifar10.DataError) as error:
        cifar10.load(data_dir)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


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
    images, labels = cifar10.load_batch_file(path)
    assert images.shape == (IMAGES_PER_BATCH, 3, 32, 32)
    assert labels.tolist() == batch["labels"]


def test_augment_crops_and_flips_on_the_device():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augmented = cifar10.augment(images)
    assert (augmented.shape, augmented.dtype) == (images.shape, torch.uint8)
    # Each output is the input shifted by at most 4 px (zero fill), possibly flipped.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for image, out in zip(padded, augmented):
        candidates = [image[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(2)) for c in candidates)
    assert not torch.equal(augmented, images)


# --- Staging, as job.sh runs it on each node ---------------------------------------------------------


def stage(destination, source, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "orion_tools", "stage-data", "--module", "cifar10.py",
                           "--destination", str(destination)], cwd=REPO_ROOT,
                          env=clean_env(CIFAR10_ARCHIVE=source, **env), capture_output=True, text=True, timeout=120)


def test_stage_copies_and_extracts_the_archive(tmp_path):
    source = write_cifar10_archive(tmp_path / "datasets", images_per_batch=20)
    result = stage(tmp_path / "node", source)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert len(cifar10.load(tmp_path / "node")["inputs"]) == 100


def test_staging_imports_no_orion(tmp_path):
    """Each node stages at every job's start, before its workers: Oríon's client (1.7 s of CPU) is not needed."""
    source = write_cifar10_archive(tmp_path / "datasets", images_per_batch=20)
    result, heavy = orion_tools_listing_heavy_imports("stage-data", "--module", "cifar10.py", "--destination",
                                                      tmp_path / "node", CIFAR10_ARCHIVE=source)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Staged cifar10.py's data set from ")
    assert heavy == "[]"


def test_missing_archive_offline_names_cifar10_archive(tmp_path):
    result = stage(tmp_path / "node", tmp_path / "missing.tar.gz",
                   CIFAR10_URL=f"file://{tmp_path}/unreachable")  # A download that fails, offline.
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: CIFAR10_ARCHIVE={tmp_path}/missing.tar.gz does not exist and the "
                                    "download failed")
    assert "export CIFAR10_ARCHIVE=" in result.stderr


def test_downloaded_archive_with_wrong_md5_is_refused(tmp_path):
    # A "download" (from a local file) of a look-alike: it is not the official archive.
    lookalike = write_cifar10_archive(tmp_path / "elsewhere", images_per_batch=20)
    result = stage(tmp_path / "node", tmp_path / "missing.tar.gz", CIFAR10_URL=f"file://{lookalike}")
    assert result.returncode == 1
    assert "is not the official archive (MD5 mismatch)" in result.stderr


def test_slurm_tmpdir_without_space_is_refused(tmp_path):
    # An archive larger than the free space (sparse: it takes no space itself).
    (tmp_path / "node").mkdir()
    archive = tmp_path / "big" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with open(archive, "wb") as file:
        file.truncate(shutil.disk_usage(tmp_path).free + 10**9)
    result = stage(tmp_path / "node", archive, SLURM_TMPDIR=tmp_path / "node")
    assert result.returncode == 1
    assert re.fullmatch(rf"error: {tmp_path}/node on \S+ has [\d,]+ MB free, and staging cifar10.py's data set from "
                        rf"{archive} needs about [\d,]+ MB: export TMPDIR=.*\n", result.stderr), result.stderr
    assert not list((tmp_path / "node").iterdir())  # Nothing copied.


# --- The README's commands for this data set ------------------------------------------------------


def test_readme_commands_for_main_py_work_as_written(tmp_path):
    commands = readme_commands("uv run python")
    assert [c.split()[3] for c in commands] == ["cifar10.py", "main.py"]
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

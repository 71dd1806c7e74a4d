"""CIFAR-10, everything about this data set in one place: staging its archive on a node's local
disk, reading and checking its pickled batches, its normalization statistics and augmentation.

main.py imports it as `dataset` and calls `dataset.load(data_dir)` and `dataset.augment(images)`;
job.sh stages it on each node (step 2: `stage`, from $CIFAR10_ARCHIVE, or downloaded and
checked, after `orion_tools stage-data` checked the node's free space for `staged_bytes`); a
small look-alike, for a first try without the real data:

    python cifar10.py sample data                # data/cifar-10-python.tar.gz, 500 generated images

To train on your own data, write a module like this one, with the same names (README, "Make it
yours"): `load`, `augment`, `stage`, `SOURCE_VARIABLE`, `DEFAULT_SOURCE`, and `write_sample` (a
small sample in the data set's own format, that the tests train on); `staged_bytes` if staging
needs more room than the source's size.

We read the pickled batches ourselves rather than through torchvision's CIFAR10 class: it checks
the official files' MD5s (so it refuses the small look-alike the tests generate) and decodes
every image through PIL in every epoch, which starves a GPU. As uint8 the training set is 150 MB.
"""

import argparse
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

# Where `stage` finds the archive: the cluster's copy (Mila's path by default), else the download.
SOURCE_VARIABLE = "CIFAR10_ARCHIVE"
DEFAULT_SOURCE = "/network/datasets/cifar10/cifar-10-python.tar.gz"
URL = os.environ.get("CIFAR10_URL", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
MD5 = "c58f30108f718f92721af3b95e74349a"  # Published with the archive (and in torchvision).
ARCHIVE, BATCHES = "cifar-10-python.tar.gz", "cifar-10-batches-py"
ARCHIVE_BYTES = 170_498_071
CLASSES = 10
# Per-channel mean and std of the training images, on the 0-255 scale of the uint8 images.
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
PADDING = 4  # Of the random crop: an eighth of the 32-pixel side.


class DataError(ValueError):
    """The data set is missing or unusable; the message says where and what to do."""


# --- Staging (job.sh, once per node) --------------------------------------------------------------


def staged_bytes(source: Path) -> int:
    """The room staging needs on the node: the archive and its extracted files (171 + 186 MB), with a margin."""
    return (source.stat().st_size if source.is_file() else ARCHIVE_BYTES) * 22 // 10


def stage(destination: Path, source: Path) -> None:
    """Copies (or downloads and checks) the archive `source` into `destination` and extracts it there."""
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / ARCHIVE
    if source.is_file():
        shutil.copyfile(source, archive)
    else:
        print(f"{SOURCE_VARIABLE}={source} does not exist: downloading {URL}", flush=True)
        try:
            urllib.request.urlretrieve(URL, archive)
        except OSError as error:
            raise DataError(f"{SOURCE_VARIABLE}={source} does not exist and the download failed ({error}; no "
                            f"internet on compute nodes?): export {SOURCE_VARIABLE}=/path/to/{ARCHIVE}") from None
        with open(archive, "rb") as file:
            if hashlib.file_digest(file, "md5").hexdigest() != MD5:
                raise DataError(f"the download of {URL} is not the official archive (MD5 mismatch): "
                                f"export {SOURCE_VARIABLE}=/path/to/{ARCHIVE}")
    find_or_extract(destination)  # Here, once, rather than in every trial.


def write_sample(folder: Path, size: int = 500) -> Path:
    """A small, learnable look-alike of the archive (`size` training images), in the official
    format; returns its path. What the tests stage and train on: no test downloads the real one.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
    from cifar10_lookalike import write_cifar10_archive

    return write_cifar10_archive(folder, images_per_batch=size // 5)


# --- Loading (main.py, once per trial) --------------------------------------------------------------


def load(data_dir: Path) -> dict:
    """The five training batches (test_batch is for the final evaluation of the chosen model, never here).

    Held on the device (150 MB as uint8): `inputs` (N, 3, 32, 32) uint8 images, `targets` (N,)
    int64 in 0..9, `classes`, and the per-channel `mean` and `std` that main.py's images are
    standardized with. No validation split of its own: main.py keeps a fixed 10 % aside.
    """
    batches_dir = find_or_extract(data_dir)
    parts = [load_batch_file(batches_dir / f"data_batch_{i}") for i in range(1, 6)]
    return dict(inputs=np.concatenate([images for images, _ in parts]),
                targets=np.concatenate([labels for _, labels in parts]), classes=CLASSES, mean=MEAN, std=STD)


def find_or_extract(data_dir: Path) -> Path:
    """Returns the `cifar-10-batches-py` folder, extracting the official archive if needed."""
    batches_dir = data_dir / BATCHES
    if batches_dir.is_dir():
        return batches_dir
    archive = data_dir / ARCHIVE
    if not archive.is_file():
        raise DataError(f"CIFAR-10 not found in {data_dir}: expected {BATCHES}/ or {ARCHIVE}; stage the official "
                        "archive there (job.sh does) or pass --data-dir")
    # Several trials may start at once on a node: each extracts into its own temporary folder
    # and renames it into place. A rename is atomic, so nobody reads a half-extracted folder;
    # the losers of the race delete their copy.
    try:
        extract_dir = Path(tempfile.mkdtemp(prefix=".extracting-", dir=data_dir))
    except OSError as error:
        raise DataError(f"cannot extract {archive}: {error}; extract it yourself or pass a writable --data-dir")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(extract_dir, filter="data")
        extracted = extract_dir / BATCHES
        if not extracted.is_dir():
            raise DataError(f"{archive} has no {BATCHES}/ folder: it is not the CIFAR-10 python archive")
        try:
            extracted.rename(batches_dir)
        except OSError:
            if not batches_dir.is_dir():  # Not a lost race: a real error.
                raise
    except (tarfile.TarError, EOFError, OSError) as error:  # zlib.error is an OSError subclass here.
        raise DataError(f"{archive} is truncated or corrupt ({error}); delete it and stage it again")
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
    return batches_dir


def load_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    if not path.is_file():
        raise DataError(f"{path} is missing; delete {path.parent} and stage CIFAR-10 again")
    try:
        with open(path, "rb") as file:
            # Pickled by Python 2: "latin1" turns its byte-string keys back into `str`
            # (as torchvision reads them).
            batch = pickle.load(file, encoding="latin1")
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        images, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception as error:  # A truncated or corrupt pickle can raise almost anything.
        raise DataError(f"{path} is truncated or corrupt ({type(error).__name__}: {error}); "
                        f"delete {path.parent} and stage CIFAR-10 again")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 images of shape (N, 3072), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path} holds no images; delete {path.parent} and stage CIFAR-10 again")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= CLASSES:
        raise DataError(f"{path}: expected {len(images)} integer labels in 0..{CLASSES - 1}")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --- Augmentation (main.py --augment, on the device) ------------------------------------------------


def augment(images):
    """A random crop of the PADDING-pixel zero-padded image, same size, and a random horizontal flip."""
    import torch  # Here, not at the top: staging (job.sh) runs without torch.
    import torch.nn.functional as F

    n, channels, height, width = images.shape
    padded = F.pad(images, (PADDING,) * 4)
    # One gather per axis builds every image's crop at once (no per-image Python loop).
    top = torch.randint(0, 2 * PADDING + 1, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, 2 * PADDING + 1, (n, 1, 1, 1), device=images.device)
    rows = (top + torch.arange(height, device=images.device).view(1, 1, height, 1))
    cropped = padded.gather(2, rows.expand(n, channels, height, width + 2 * PADDING))
    cols = (left + torch.arange(width, device=images.device).view(1, 1, 1, width))
    cropped = cropped.gather(3, cols.expand(n, channels, height, width))
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(3), cropped)


if __name__ == "__main__":  # python cifar10.py sample FOLDER
    parser = argparse.ArgumentParser(description="Write a small look-alike of the CIFAR-10 archive, for a first try.")
    parser.add_argument("command", choices=["sample"])
    parser.add_argument("folder", type=Path)
    print(write_sample(parser.parse_args().folder))

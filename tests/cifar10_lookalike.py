"""A small, learnable CIFAR-10 look-alike written in CIFAR-10's official python format.

The official `cifar-10-batches-py/*_batch*` files are Python 2 pickles: dicts whose keys
are Python 2 `str` (byte strings), holding a (N, 3072) uint8 array `data` (channel-major
rows) and a list `labels`. Python 3's pickle cannot write Python 2 `str`, so we emit the
same opcodes Python 2 did (SHORT_BINSTRING / BINSTRING) for every `bytes` object. The
result loads like the real files: keys come back as `str` with `encoding="latin1"`.

Each class is a distinct colour with a bright square at a class-specific position, plus
noise, so ResNet18 beats chance (10 %) after one short epoch on the CPU.
"""

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Python2Pickler(pickle._Pickler):  # The pure-Python pickler lets us add opcodes.
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, data: bytes):
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(data)

    dispatch[bytes] = save_py2_str


def dumps_py2(obj) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    colours = np.random.default_rng(0).integers(30, 226, size=(10, 3))
    images = rng.normal(0, 25, size=(len(labels), 3, 32, 32)) + colours[labels][:, :, None, None]
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[i, :, 4 + 8 * row : 10 + 8 * row, 2 + 8 * col : 8 + 8 * col] = 255
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def batch_dict(name: str, labels: np.ndarray, rng: np.random.Generator) -> dict:
    return {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": make_images(labels, rng),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))],
    }


def write_cifar10_lookalike(data_dir: Path, images_per_batch: int = 300, seed: int = 0) -> Path:
    """Writes `data_dir/cifar-10-batches-py/` and returns that folder."""
    rng = np.random.default_rng(seed)
    batches_dir = Path(data_dir) / "cifar-10-batches-py"
    batches_dir.mkdir(parents=True, exist_ok=True)
    for name in BATCH_FILES:
        labels = rng.integers(0, 10, size=images_per_batch)
        (batches_dir / name).write_bytes(dumps_py2(batch_dict(name, labels, rng)))
    (batches_dir / "batches.meta").write_bytes(dumps_py2({b"label_names": [b"class%d" % i for i in range(10)]}))
    return batches_dir


def write_cifar10_archive(data_dir: Path, images_per_batch: int = 300, seed: int = 0) -> Path:
    """Writes only `data_dir/cifar-10-python.tar.gz` (as the official download) and returns it."""
    data_dir = Path(data_dir)
    staging = data_dir / ".staging"
    write_cifar10_lookalike(staging, images_per_batch, seed)
    archive = data_dir / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for file in (staging / "cifar-10-batches-py").iterdir():
        file.unlink()
    (staging / "cifar-10-batches-py").rmdir()
    staging.rmdir()
    return archive


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a small CIFAR-10 look-alike in the official format.")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--images-per-batch", type=int, default=100)
    parser.add_argument("--archive", action="store_true", help="write only cifar-10-python.tar.gz")
    args = parser.parse_args()
    if args.archive:
        print(write_cifar10_archive(args.data_dir, args.images_per_batch))
    else:
        print(write_cifar10_lookalike(args.data_dir, args.images_per_batch))

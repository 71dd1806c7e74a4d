"""The data contract (trial_support/data.py), on data of its own: images, float features and token ids; classes
or float targets; held on the device or streamed; and every mistake a data set module can make, each
one error line. Independent of main.py's data set: these pass whatever main.py trains on."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import main
from conftest import REPO_ROOT, clean_env
from trial_support import Data, Trial

RNG = np.random.default_rng(0)
IMAGES = dict(inputs=RNG.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), targets=RNG.integers(0, 4, 40),
              classes=4, mean=(128.0,) * 3, std=(64.0,) * 3)
FEATURES = dict(inputs=RNG.normal(size=(40, 5)), targets=RNG.normal(size=40) + 0.5, mean=np.zeros(5), std=np.ones(5))
TOKENS = dict(inputs=RNG.integers(0, 100, (40, 12)), targets=RNG.integers(0, 3, 40), classes=3)


class Pairs(torch.utils.data.Dataset):
    """A streamed data set: (input, target) pairs, read one at a time."""

    def __init__(self, inputs, targets, noisy: bool = False, flip: bool = False):
        self.inputs, self.targets, self.noisy, self.flip = inputs, targets, noisy, flip

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        extra = np.random.random() if self.noisy else 0.0  # Random augmentation in the Dataset: refused.
        item = torch.as_tensor(self.inputs[index] + extra)
        if self.flip and torch.rand(()) < 0.5:  # torchvision's RandomHorizontalFlip, in effect.
            item = item.flip(-1)
        return item, self.targets[index]


def load(loaded, *argv) -> Data:
    return Trial(main.parse_args(["--batch-size", "4", "--loader-workers", "0", *argv])).load_data(lambda _: loaded)


def error_of(loaded) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load(loaded)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize("loaded, classes, dtypes", [
    (IMAGES, 4, (torch.uint8, torch.int64)),
    (FEATURES, None, (torch.float32, torch.float32)),  # float64 becomes float32, never an integer.
    (TOKENS, 3, (torch.int64, torch.int64)),
])
def test_each_kind_of_data_is_held_with_its_own_types(loaded, classes, dtypes):
    data = load(loaded)
    inputs, targets = data.sample(4)
    assert (data.classes, data.streamed, (inputs.dtype, targets.dtype)) == (classes, False, dtypes)
    assert (data.train_size, data.valid_size) == (36, 4)
    if "mean" not in loaded:
        assert data.prepare(inputs) is inputs  # Token ids reach the model as they are.
    else:
        assert data.prepare(inputs).dtype == torch.float32


def test_float_targets_are_never_truncated():
    data = load(dict(FEATURES, targets=np.array([0.7, 2.9, 3.99] * 13 + [1.5])))
    _, targets = next(data.valid_batches())
    assert not torch.equal(targets, targets.round())


def test_the_data_sets_own_validation_split_is_kept():
    loaded = dict(FEATURES, valid_inputs=FEATURES["inputs"][:7], valid_targets=FEATURES["targets"][:7])
    data = load(loaded)
    assert (data.train_size, data.valid_size) == (40, 7)
    inputs, _ = next(data.valid_batches())
    assert torch.allclose(inputs, torch.as_tensor(FEATURES["inputs"][:4], dtype=torch.float32))


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_streamed_data_set_serves_the_same_batches_as_held(workers):
    held = load(IMAGES)
    streamed = load({k: v for k, v in IMAGES.items() if k not in ("inputs", "targets")}
                    | {"dataset": Pairs(IMAGES["inputs"], IMAGES["targets"])}, "--loader-workers", workers)
    assert streamed.streamed and (streamed.train_size, streamed.valid_size) == (held.train_size, held.valid_size)
    order = torch.randperm(held.train_size, generator=torch.Generator().manual_seed(1))
    for (a, b), (c, d) in zip(held.train_batches(order, 2), streamed.train_batches(order, 2)):
        assert torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(held.valid_batches(), streamed.valid_batches()):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("change, expected", [
    (lambda d: {k: v for k, v in d.items() if k != "inputs"}, "have no `inputs`: load() must return either"),
    (lambda d: {**d, "classes": 1.5}, "declare classes=1.5: a classification needs an integer number of classes"),
    (lambda d: {**d, "targets": d["targets"] + 4}, "have targets from 4 to 7, but 4 classes need targets in 0..3"),
    (lambda d: {**d, "targets": d["targets"].astype(float)}, "declare 4 classes but have float32 targets"),
    (lambda d: {k: v for k, v in d.items() if k != "classes"}, "have int64 targets and declare no classes"),
    (lambda d: {**d, "targets": d["targets"][:-1]}, "have 40 `inputs` but 39 `targets`: one target per input"),
    (lambda d: {**d, "mean": (0.0,) * 4}, "have 3 channel(s) (inputs of shape (3, 8, 8)), but the data set's mean"),
    (lambda d: {**d, "std": (0.0,) * 3}, "have a std of 0.0 in the data set's std"),
    (lambda d: {k: v for k, v in d.items() if k != "std"}, "give only one of `mean` and `std`"),
    (lambda d: {**d, "valid_inputs": d["inputs"]}, "give only one of `valid_inputs` and `valid_targets`"),
    (lambda d: {**d, "inputs": np.array(["a"] * 40, dtype=object)}, "give `inputs` as a ndarray that is not an array"),
    (lambda d: {k: v for k, v in d.items() if k not in ("inputs", "targets")} | {"dataset": [1, 2]},
     "give `dataset` as a list: it must be a torch Dataset"),
    (lambda d: {k: v for k, v in d.items() if k not in ("inputs", "targets")}
     | {"dataset": Pairs(d["inputs"].astype(float), d["targets"], noisy=True)}, "differs from one read to the next"),
    (lambda d: {k: v for k, v in d.items() if k not in ("inputs", "targets")}
     | {"dataset": Pairs(d["inputs"], d["targets"], flip=True)}, "differs from one read to the next"),
    (lambda d: tuple(d.values()), "load() returned a tuple: it must return a dict with either"),
])
def test_what_the_data_set_returns_is_checked_in_one_line(change, expected):
    assert expected in error_of(change(IMAGES))


def test_a_batch_larger_than_the_data_is_one_line():
    with pytest.raises(SystemExit) as exit_info:
        Trial(main.parse_args(["--batch-size", "64"])).load_data(lambda _: IMAGES)
    assert str(exit_info.value.code).endswith("hold 36 training examples, fewer than --batch-size 64: pass a smaller one")


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated", b"\x00\x01garbage" * 10])
def test_a_damaged_file_in_the_data_set_module_is_one_error_line_naming_it(tmp_path, content):
    """A module that reads a .npz (numpy's own errors: BadZipFile, pickle's message) fails in one line."""
    (tmp_path / "data.npz").write_bytes(content)
    program = ("import sys, numpy as np, main\n"
               "def load(folder):\n"
               "    with np.load(folder / 'data.npz') as file:\n"
               "        return dict(inputs=file['x'], targets=file['y'])\n"
               "main.dataset.load = load\n"
               "main.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--data-dir", str(tmp_path), "--epochs", "1"],
                            env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: <string>'s load({tmp_path}) failed: "), result.stderr


def test_a_streamed_item_that_cannot_be_read_is_one_error_line(tmp_path):
    program = ("import torch, main\n"
               "class Broken(torch.utils.data.Dataset):\n"
               "    def __len__(self): return 40\n"
               "    def __getitem__(self, i):\n"
               "        if i >= 0 and torch.utils.data.get_worker_info() is not None:\n"
               "            raise OSError(f'cannot read photo {i}.jpg')\n"
               "        return torch.zeros(3, 8, 8, dtype=torch.uint8), 0\n"
               "main.dataset.load = lambda folder: dict(dataset=Broken(), classes=2, mean=(0,) * 3, std=(1,) * 3)\n"
               "main.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--epochs", "1", "--batch-size", "4",
                             "--loader-workers", "1"], env=clean_env(), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: reading a ") and "OSError: cannot read photo" in result.stderr, result.stderr


@pytest.mark.parametrize("patch, expected", [
    ("main.evaluate = lambda *args: 0.5", "error: evaluate() returned float 0.5: it must return a dict of metrics"),
    ("main.objective = lambda metrics: metrics['no_such_metric']",
     "error: objective(metrics) failed on evaluate()'s metrics ["),
    ("evaluate = main.evaluate; main.evaluate = lambda *args: {**evaluate(*args), 'epoch': 1}",
     "error: evaluate() returned a metric named 'epoch', a name metrics.jsonl keeps for itself"),
])
def test_evaluate_and_objective_mistakes_are_one_error_line(data_dir, patch, expected):
    program = f"import main\n{patch}\nmain.main()\n"
    result = subprocess.run([sys.executable, "-c", program, "--data-dir", str(data_dir), "--epochs", "1"],
                            env=clean_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(expected), result.stderr


def test_the_stability_check_leaves_the_trials_random_state_alone():
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    load({k: v for k, v in IMAGES.items() if k not in ("inputs", "targets")}
         | {"dataset": Pairs(IMAGES["inputs"], IMAGES["targets"])})
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])


def test_augment_without_the_modules_augment_is_one_error_line(tmp_path):
    (tmp_path / "plain.py").write_text("import numpy as np\n"
                                       "def load(folder):\n"
                                       "    return dict(inputs=np.zeros((40, 3)), targets=np.zeros(40))\n")
    program = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
               "import main, plain\nmain.dataset = plain\nmain.main()\n")
    result = subprocess.run([sys.executable, "-c", program, "--epochs", "1", "--augment"], env=clean_env(),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("error: --augment, but plain.py has no augment(inputs): add one (README, \"Make it "
                             "yours\"), or drop --augment and its line in main.py's train_step\n"), result.stderr

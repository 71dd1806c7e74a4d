"""The training step as one CUDA graph (main.py --cuda-graph): the same training as eager, on a GPU.

Without a GPU, only the fallback is tested (the graph tests skip and say so); on a GPU
machine, run `python -m pytest tests/test_cuda_graph.py` (benchmarks/run_gpu.sh does).
"""

import signal
import subprocess
import sys

import pytest
import torch

import main
from conftest import MAIN_PY, REPO_ROOT, clean_env, read_metrics, run_main
from trial_support import Data, Trial

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# bf16 autocast: eager and graph runs may pick other kernels, so losses agree to bf16's precision.
BF16_TOLERANCE = dict(rel=0.05, abs=0.02)


def step_args(**overrides) -> list[str]:
    arguments = dict(learning_rate=1e-3, weight_decay=1e-4, batch_size=64, **overrides)
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in arguments.items() if not isinstance(value, bool)]
    return argv + [f"--{name.replace('_', '-')}" for name, value in arguments.items() if value is True]


def losses_of_steps(argv: list[str], n_steps: int) -> list[float]:
    """The loss of each of `n_steps` training steps on fixed random batches, from a fixed initialization,
    with main.py's model, optimizer and step as its main() builds them."""
    args = main.parse_args(argv)
    trial = Trial(args)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n_steps, args.batch_size, 3, 32, 32), dtype=torch.uint8, device=trial.device)
    labels = torch.randint(0, 10, (n_steps, args.batch_size), device=trial.device)
    data = Data({"inputs": images[0], "targets": labels[0], "valid_inputs": images[0], "valid_targets": labels[0],
                 "classes": 10, "mean": (128.0,) * 3, "std": (64.0,) * 3},
                trial.device, trial.memory_format, args.batch_size, loader_workers=0)
    model = trial.place(main.build_model(args, data))
    optimizer = main.build_optimizer(args, model, trial)
    step = trial.make_step(main.train_step, model, optimizer, data)
    losses = [(step(images[i], labels[i]) / args.batch_size).item() for i in range(n_steps)]
    return losses, step


def test_without_a_gpu_cuda_graph_warns_and_trains_eagerly(data_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the graph tests below run instead")
    result = run_main("--data-dir", data_dir, "--epochs", "1", "--batch-size", "64", "--cuda-graph",
                      "--checkpoint-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--cuda-graph needs a GPU and no --compile: training without the graph" in result.stdout


@needs_cuda
def test_the_step_is_captured():
    _, step = losses_of_steps(step_args(cuda_graph=True), n_steps=6)
    assert step.graph is not None


@needs_cuda
@pytest.mark.parametrize("augment", [False, True])
def test_graph_losses_match_eager_losses(augment):
    eager, _ = losses_of_steps(step_args(augment=augment), n_steps=12)
    graphed, _ = losses_of_steps(step_args(augment=augment, cuda_graph=True), n_steps=12)
    assert graphed == pytest.approx(eager, **BF16_TOLERANCE)


@needs_cuda
def test_graph_training_learns(data_dir, tmp_path):
    result = run_main("--data-dir", data_dir, "--epochs", "2", "--batch-size", "32", "--learning-rate", "1e-3",
                      "--cuda-graph", "--checkpoint-dir", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    record = read_metrics(tmp_path)[-1]
    assert record["objective"] < record["untrained_objective"]


@needs_cuda
def test_sigterm_with_the_graph_resumes_like_an_uninterrupted_run(data_dir, tmp_path):
    args = ["--data-dir", data_dir, "--epochs", "3", "--batch-size", "16", "--learning-rate", "1e-3",
            "--cuda-graph"]
    reference = run_main(*args, "--checkpoint-dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stdout + reference.stderr

    trial = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, MAIN_PY, *map(str, args), "--checkpoint-dir", trial],
                               env=clean_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:  # Signal it in the middle of epoch 1 (after epoch 0's line).
        if "Epoch 0: " in line:
            break
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    resumed = run_main(*args, "--checkpoint-dir", trial)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    objectives = [r["objective"] for r in read_metrics(trial)]
    assert objectives == pytest.approx([r["objective"] for r in read_metrics(tmp_path / "reference")], abs=0.1)

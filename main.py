"""Train torchvision's ResNet18 on CIFAR-10 with the hyperparameters given on the command line,
and report 1 - validation accuracy to Oríon: one trial of the search that job.sh runs.

Result: upstream's log shows 72 % validation accuracy after 10 epochs at learning rate 1.4e-3
for this model and optimizer; here an epoch of 45,000 images trains in about 4 s on one H200,
and five trials can share it (benchmarks/RESULTS.md). By hand, on a GPU or (slowly) a CPU:

    uv run python main.py --data-dir ./data --epochs 1

This is the file to make yours (README, "Make it yours"): the data set, the hyperparameters, the
model and optimizer, the training step, the metrics and the objective, and the trial itself, in
the order they run. What stays as it is lives in trial_support/ (its __init__ lists it), which you
need not open: the data's checks and batches, checkpoints and exact resume, preemption (exit 130:
Oríon's "interrupted"), the metrics file, Oríon's results file, the CUDA-graph step, one-line errors.
"""

import functools

import torch
import torch.nn.functional as F
from torchvision.models import resnet18

# The data set: a module with `load(data_dir)` (arrays held on the device, or a torch Dataset
# streamed from disk: trial_support/data.py), `augment`, and `stage` and `write_sample` for job.sh and the
# tests. cifar10.py is the example; job.sh stages the module named here.
import cifar10 as dataset
from trial_support import Trial, argument_parser, int_at_least, non_negative_float, positive_float


# --- 1. Hyperparameters -------------------------------------------------------------------------
# One line each; job.sh's `priors` search some of them. Each is checked here: a bad value is one
# error line (exit 2) before anything else runs. What may change when a trial resumes (--epochs,
# paths): trial_support.MAY_CHANGE_ON_RESUME; every other argument must match its checkpoint.


def parse_args(argv: list[str] | None = None):
    parser = argument_parser(__doc__)  # With --seed, --data-dir, --checkpoint-dir, --compile, --cuda-graph.
    parser.add_argument("--epochs", type=int_at_least(1), default=10)
    parser.add_argument("--learning-rate", type=positive_float, default=5e-4)
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--batch-size", type=int_at_least(2, " (BatchNorm needs two images)"), default=128)
    parser.add_argument("--augment", action="store_true",
                        help="augment the training images (the data set's own augmentation), on the device")
    return parser.parse_args(argv)


# --- 2. Model and optimizer ---------------------------------------------------------------------


def build_model(args, data) -> torch.nn.Module:
    """The network, for `data.classes` classes (None: a regression) of inputs shaped `data.input_shape`."""
    return resnet18(num_classes=data.classes)


def build_optimizer(args, model, trial) -> torch.optim.Optimizer:
    # trial.optimizer_options: fused on a GPU; capturable for --cuda-graph (AdamW and Adam have both).
    return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                             **trial.optimizer_options)


# --- 3. Training step, evaluation and objective -------------------------------------------------


def train_step(model, optimizer, inputs, targets, args, data, trial) -> torch.Tensor:
    """One optimization step on a batch as the data set stores it; returns the batch's summed loss,
    on the device. `args` holds every hyperparameter, for the loss too.

    Nothing here waits for the GPU (no `.item()`, no copy from Python): the CPU runs ahead, and
    --cuda-graph captures this function whole. The benchmarks time this very function.
    """
    x = data.prepare(dataset.augment(inputs) if args.augment else inputs)  # uint8 -> standardized float.
    with trial.autocast():  # bf16 on a GPU.
        outputs = model(x)
    loss = F.cross_entropy(outputs.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(targets)


@torch.no_grad()
def evaluate(model, data, trial, args) -> dict[str, float]:
    """The metrics of the model on the whole validation set, by name: each epoch's line, metrics.jsonl
    and the report show them."""
    model.eval()
    total_loss = torch.zeros((), device=trial.device)
    correct = torch.zeros((), device=trial.device, dtype=torch.long)
    for inputs, targets in data.valid_batches():
        with trial.autocast():
            outputs = model(data.prepare(inputs))
        total_loss += F.cross_entropy(outputs.float(), targets, reduction="sum")
        correct += (outputs.argmax(dim=1) == targets).sum()
    return {"val_loss": total_loss.item() / data.valid_size, "val_accuracy": correct.item() / data.valid_size}


# What Oríon minimizes, computed from evaluate's metrics, and its name: Oríon keeps the name with
# each value; the epoch lines, the report and the job's summary show it.
OBJECTIVE = "1 - validation accuracy"


def objective(metrics: dict[str, float]) -> float:
    return 1.0 - metrics["val_accuracy"]


# --- 4. The trial ---------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    trial = Trial.start(args, OBJECTIVE, objective)  # Logging, seeds, the device; from here a stop signal is noted.
    with trial.failing_on_gpu_out_of_memory():
        data = trial.load_data(dataset.load)  # Checked, split (always the same), held on the device or streamed.
        model = trial.place(build_model(args, data))
        optimizer = build_optimizer(args, model, trial)
        step = trial.make_step(train_step, model, optimizer, data)  # Checks the model's output against the data.
        validate = functools.partial(evaluate, model, data, trial, args)
        state = trial.resume_or_start(model, optimizer, validate)  # From --checkpoint-dir, if it holds one.
        while state.epoch < args.epochs and not state.diverged:
            trial.train_one_epoch(state, model, optimizer, step, data)  # On a stop signal: save, exit 130.
            trial.end_epoch(state, model, optimizer, validate())  # Log, metrics, checkpoint.
    trial.report(state)  # The last epoch's objective; a diverged run's is its untrained model's.


if __name__ == "__main__":
    main()

"""Train torchvision's ResNet18 on CIFAR-10 with the hyperparameters given on the command line,
and report 1 - validation accuracy to Oríon: one trial of the search that job.sh runs.

Result: upstream's log shows 72 % validation accuracy after 10 epochs at learning rate 1.4e-3
for this model and optimizer; here an epoch of 45,000 images trains in about 4 s on one H200,
and five trials can share it (benchmarks/RESULTS.md). By hand, on a GPU or (slowly) a CPU:

    uv run python main.py --data-dir ./data --epochs 1

This is the file to make yours (README, "Make it yours"): the data set, the objective, the
hyperparameters, the model and optimizer, the training step and evaluation, and the trial
itself, in the order they run. What stays as it is lives in trial_support.py, which you need
not open: checkpoints and exact resume, preemption (exit 130: Oríon's "interrupted"), the
metrics file, Oríon's results file, the CUDA-graph step, one-line errors.
"""

import functools

import torch
import torch.nn.functional as F
from torchvision.models import resnet18

# The data set: a module with `load(data_dir)`, `augment(images)`, and `stage` and `write_sample`
# for job.sh and the tests. cifar10.py is the example; job.sh stages it from its name here.
import cifar10 as dataset
from trial_support import Trial, argument_parser, int_at_least, non_negative_float, positive_float

# What Oríon minimizes. Oríon keeps the name with each value; the report and the job's summary show it.
OBJECTIVE = "1 - validation accuracy"


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
    """The network, for `data.classes` classes of images shaped like `data.train_images[0]`."""
    return resnet18(num_classes=data.classes)


def build_optimizer(args, model, trial) -> torch.optim.Optimizer:
    # trial.optimizer_options: fused on a GPU; capturable for --cuda-graph (AdamW and Adam have both).
    return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                             **trial.optimizer_options)


# --- 3. Training step and evaluation ------------------------------------------------------------


def train_step(model, optimizer, images, labels, data, trial, augment: bool = False) -> torch.Tensor:
    """One optimization step on a batch of uint8 images; returns the batch's summed loss, on the device.

    Nothing here waits for the GPU (no `.item()`, no copy from Python): the CPU runs ahead, and
    --cuda-graph captures this function whole. The benchmarks time this very function.
    """
    x = data.normalize(dataset.augment(images) if augment else images)
    with trial.autocast():  # bf16 on a GPU.
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(labels)


@torch.no_grad()
def evaluate(model, images, labels, data, trial) -> tuple[float, float]:
    """Mean cross-entropy per image and accuracy, over the whole validation set."""
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), 500):
        x, y = data.normalize(images[start:start + 500]), labels[start:start + 500]
        with trial.autocast():
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    return total_loss.item() / len(images), correct.item() / len(images)


# --- 4. The trial ---------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    trial = Trial.start(args)  # Logging, seeds, the device; from here a stop signal is noted.
    with trial.failing_on_gpu_out_of_memory():
        data = trial.load_data(dataset.load)  # Checked, split 90/10 (always the same), on the device.
        model = trial.place(build_model(args, data))
        optimizer = build_optimizer(args, model, trial)
        state = trial.resume_or_start(model, optimizer)  # From --checkpoint-dir, if it holds one.
        step = trial.make_step(functools.partial(train_step, data=data, trial=trial, augment=args.augment),
                               model, optimizer, data)
        while state.epoch < args.epochs and not state.diverged:
            trial.train_one_epoch(state, model, optimizer, step, data)  # On a stop signal: save, exit 130.
            val_loss, val_accuracy = evaluate(model, data.valid_images, data.valid_labels, data, trial)
            trial.end_epoch(state, model, optimizer, data, val_loss, val_accuracy)  # Log, metrics, checkpoint.
    # A diverged run still reports: its poor accuracy is what the search must learn from.
    trial.report(OBJECTIVE, 1.0 - trial.reported_epoch(state)["val_accuracy"])


if __name__ == "__main__":
    main()

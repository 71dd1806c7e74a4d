"""Does a prior span values where the model learns? For each prior of --learning-rate (job.sh's
form), N random configurations (learning rate from that prior, weight decay from job.sh's), each
a real main.py trial of a few epochs on the generated CIFAR-10 look-alike; counts the trials whose
validation accuracy ends above twice chance (20 %, 10 classes), those that reach 90 % (most
reach 100 % on this easy data: below 90 %, the learning rate held the model back), and those
that diverged.

    uv run python benchmarks/prior_fit.py [--quick] [--trials 16] [--epochs 2] \\
        [--priors 'loguniform(1e-5, 1.0)' 'loguniform(1e-5, 1e-2)']

The look-alike is easier than CIFAR-10 (a colour and a square per class), so a learning rate that
fails here fails on the real data too; the converse need not hold.
"""

import shutil
import tempfile
from pathlib import Path

import common

WEIGHT_DECAY_PRIOR = "loguniform(1e-6, 1e-1)"  # job.sh's.


def sample(prior: str, n: int, seed: int) -> list[float]:
    from orion.core.io.space_builder import SpaceBuilder  # Oríon's own sampling of a prior.

    space = SpaceBuilder().build({"x": prior})
    return [float(trial.params["x"]) for trial in space.sample(n, seed=seed)]


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--trials", type=int, default=16, help="random configurations per prior")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--priors", nargs="+", default=["loguniform(1e-5, 1.0)", "loguniform(1e-5, 1e-2)"])
    args = parser.parse_args()
    if args.trials < 1 or args.epochs < 1:
        raise SystemExit("error: --trials and --epochs must be positive")
    trials, epochs = (1, 1) if args.quick else (args.trials, args.epochs)
    common.print_header("Prior fit: random trials that learn, by learning-rate prior", args)
    data_dir = common.ensure_data(args.data_root, 100 if args.quick else 400)
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="prior-fit-"))
    try:
        for p, prior in enumerate(args.priors):
            rates = sample(prior, trials, seed=1 + p)
            decays = sample(WEIGHT_DECAY_PRIOR, trials, seed=101 + p)
            learned = learned_well = diverged = 0
            for i, (rate, decay) in enumerate(zip(rates, decays)):
                trial = common.run_trial(
                    f"{prior} #{i}", common.main_command(data_dir, epochs, "--batch-size", 64, "--learning-rate",
                                                        rate, "--weight-decay", decay),
                    folder / f"{p}-{i}", args.timeout)
                accuracy = trial.last["val_accuracy"]
                learned += accuracy is not None and accuracy > 0.2
                learned_well += accuracy is not None and accuracy >= 0.9
                diverged += trial.last["diverged"]
                print(f"  lr {rate:.2e} wd {decay:.1e}: accuracy {accuracy}, diverged {trial.last['diverged']}",
                      flush=True)
            rows.append([f"--learning-rate~'{prior}'", trials, learned, learned_well, diverged,
                         f"{learned_well / trials:.0%}"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    common.print_table(f"{trials} random trial(s) per prior, {epochs} epoch(s), batch 64, look-alike of "
                       f"{5 * (100 if args.quick else 400)} images",
                       ["prior", "trials", "above 2x chance", "reach 90 %", "diverged", "share that reaches 90 %"],
                       rows)


if __name__ == "__main__":
    main()

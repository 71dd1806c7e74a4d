"""What every trial of main.py does besides training, kept as it is when you make main.py yours.

main.py imports from here the `Trial` (its data, device, loop, checkpoints, report) and the
argument helpers; nothing else needs opening. One module per concern, each importing only those
above it in this list:

    data.py         what the data set module returns, checked against what it declares, split, and
                    served in batches on the device: held there whole, or streamed from disk
    arguments.py    the command line's fixed part, and the checks of main.py's hyperparameters
    reservation.py  whether another worker took this trial over (its worker stalled): then stop
    logs.py         log lines and train.log, one-line errors, memory, Oríon's results file
    signals.py      preemption: a stop signal noted, acted on between two steps (exit 130)
    cuda_graph.py   the training step replayed as one CUDA graph (--cuda-graph)
    checkpoints.py  checkpoints and exact resume; metrics.jsonl beside them
    trial.py        the trial: device, data, the epoch, the objective, a diverged run's report
"""

from .data import FORMS, SPLIT_SEED, VALIDATION_FRACTION, Data, DataProblem, default_loader_workers  # noqa: F401
from .arguments import (MAY_CHANGE_ON_RESUME, argument_parser, int_at_least, non_negative_float,  # noqa: F401
                        number_in, positive_float)
from .logs import fail, report_objective  # noqa: F401
from .signals import INTERRUPTED_EXIT_CODE, StopSignal  # noqa: F401
from .cuda_graph import CudaGraphTrainStep  # noqa: F401
from .checkpoints import (CHECKPOINT_FORMAT, TrainingState, save_and_exit_interrupted,  # noqa: F401
                          save_checkpoint_and_metrics, temporary_path, write_metrics)
from .trial import RECORD_FIELDS, Trial, check_model_output  # noqa: F401

"""Preemption: SIGTERM, SIGUSR1 and SIGINT are noted, and acted on between two training steps (save,
exit 130: Oríon's "interrupted").
"""


import os
import signal


# Oríon marks a trial that exits with this code `interrupted` (not `broken`) and hands it, with
# the same working directory, to the next free worker. Oríon tells us the code it uses.
INTERRUPTED_EXIT_CODE = int(os.environ.get("ORION_INTERRUPT_CODE", 130))

# --- Preemption: a stop signal is noted, and acted on at the next step -----------------------------


class StopSignal:
    """Slurm sends SIGTERM (or job.sh forwards one) a while before it kills the job.

    The handler only notes it; the training loop checks `received` between steps, then saves a
    checkpoint and exits with Oríon's "interrupted" code.
    """

    def __init__(self):
        self.received: int | None = None

    def handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def install(self) -> None:
        # SIGINT too: Ctrl-C under `bash job.sh` reaches every process of the terminal, and a
        # trial killed by KeyboardInterrupt would be marked broken instead of interrupted.
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, self.handle)



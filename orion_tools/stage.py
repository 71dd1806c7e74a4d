"""`stage-data`: the data set of main.py's data set module, copied to a node's local disk once
per node, after a check that it has room.
"""

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path



def stage_data(args) -> int:
    """Stages the data set of main.py's data set module (--module FILE) in --destination: job.sh, step 2,
    once per node. The module's `stage(destination, source)`, from $SOURCE_VARIABLE or its DEFAULT_SOURCE,
    after a check that the node has room for it: the module's `staged_bytes(source)`, else the
    source's size (a file, or every file below a folder)."""
    spec = importlib.util.spec_from_file_location(Path(args.module).stem, args.module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = Path(os.environ.get(module.SOURCE_VARIABLE) or module.DEFAULT_SOURCE)
    destination = Path(args.destination)
    try:
        destination.mkdir(parents=True, exist_ok=True)
        needed = module.staged_bytes(source) if hasattr(module, "staged_bytes") else size_on_disk(source)
        free = shutil.disk_usage(destination).free
        if needed > free:
            print(f"error: {destination} on {socket.gethostname()} has {free // 10**6:,} MB free, and staging "
                  f"{Path(args.module).name}'s data set from {source} needs about {needed // 10**6 + 1:,} MB: "
                  f"{more_space_advice(needed)}", file=sys.stderr)
            return 1
        module.stage(destination, source)
    except (OSError, ValueError) as error:  # cifar10.DataError is a ValueError.
        print(f"error: {error}" if isinstance(error, ValueError) else
              f"error: staging {Path(args.module).name}'s data set from {source} in {args.destination} failed "
              f"({error})", file=sys.stderr)
        return 1
    print(f"Staged {Path(args.module).name}'s data set from {source} ({module.SOURCE_VARIABLE}) in "
          f"{args.destination} on {socket.gethostname()}", flush=True)
    return 0


def size_on_disk(source: Path) -> int:
    """Bytes of a file, or of every file below a folder (0 if it does not exist: the module says why)."""
    if source.is_file():
        return source.stat().st_size
    return sum(path.stat().st_size for path in source.rglob("*") if path.is_file()) if source.is_dir() else 0


def more_space_advice(needed: int) -> str:  # Under Slurm, or a dry run of job.sh.
    if "SLURM_JOB_ID" in os.environ:
        return (f"ask for nodes with more local disk (sbatch --tmp={needed // 10**6 + 1}M, where the cluster sets "
                "it), or read the data in place (docs/make-it-yours.md)")
    return "export TMPDIR=a folder with more space (this dry run's $SLURM_TMPDIR is made there)"



"""A light stand-in for main.py, for tests of the search machinery (budget, workers, database).

Runs in a fraction of a second instead of main.py's import of torch: sleeps --sleep seconds,
then reports a made-up objective to Oríon through its results file, as main.py does.
"""

import argparse
import json
import math
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--learning-rate", type=float, required=True)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()
time.sleep(args.sleep)
objective = abs(math.log10(args.learning_rate) + 3)  # Best at 1e-3.
with open(os.environ["ORION_RESULTS_PATH"], "w") as file:
    json.dump([{"name": "objective", "type": "objective", "value": objective}], file)

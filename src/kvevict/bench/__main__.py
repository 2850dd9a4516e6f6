"""Worker entry point: run one benchmark configuration and print its result as one JSON line."""

import json
import sys

from . import BenchSpec, run_one

if __name__ == "__main__":
    payload = json.loads(sys.argv[1])
    print(json.dumps(run_one(BenchSpec(**payload["spec"]), payload["config"])))

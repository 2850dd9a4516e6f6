"""Worker entry point: run one benchmark configuration and print its result as one JSON line.

`python -m kvevict.bench --compare [options]` runs the overhead comparison (compare.py) instead.
"""

import json
import sys

from . import BenchSpec, run_one


def compare_main(argv: list[str]) -> None:
    import argparse

    from .compare import ROWS, CompareSpec, compare, format_table

    parser = argparse.ArgumentParser(prog="python -m kvevict.bench --compare",
                                     description="each overhead as a ratio to the plain path, in one process")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args(argv)
    try:
        spec = CompareSpec(model=args.model, context=args.context, dtype=args.dtype, threads=args.threads,
                           repeats=args.repeats, decode_tokens=args.decode_tokens,
                           rows=[r for r in args.rows.split(",") if r])
    except ValueError as error:
        parser.error(str(error))
    print(format_table(compare(spec, out=args.out)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare_main(sys.argv[2:])
    else:
        payload = json.loads(sys.argv[1])
        print(json.dumps(run_one(BenchSpec(**payload["spec"]), payload["config"])))

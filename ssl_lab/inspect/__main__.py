"""`python -m ssl_lab.inspect <file or folder> [--json] [--sample N]`: a report on stdout; exit 2 if it cannot look."""

from __future__ import annotations

import argparse
import json
import sys

from ssl_lab.errors import SSLLabError
from ssl_lab.inspect import format_report, inspect_path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssl_lab.inspect",
        description="Report keys, layouts, NaN/Inf, per-channel statistics and class balance of an HDF5 file or an "
                    "image folder, with a `python run.py` line that loads it.",
    )
    p.add_argument("path", help="an HDF5 file or an image folder")
    p.add_argument("--json", action="store_true", help="print the findings as JSON instead of text")
    p.add_argument("--sample", type=_positive, default=None, metavar="N",
                   help="read at most N rows of each HDF5 array (1-D label/target columns are read whole) or decode "
                        "at most N files of a folder (default: all)")
    p.add_argument("--block-mb", type=_positive, default=64, help="HDF5 read size in MB; bounds memory (default 64)")
    args = p.parse_args(argv)
    try:
        report = inspect_path(args.path, args.sample, block_bytes=args.block_mb << 20)
    except SSLLabError as e:
        print(f"ssl_lab: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, allow_nan=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

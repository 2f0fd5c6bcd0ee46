"""PNG curves from a run's metrics.jsonl: `python scripts/plot_metrics.py --workdir W [--out DIR] [--keys a,b]`.

See `t3rl_jax.plots` for the grouping; files go to WORKDIR/plots by default.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t3rl_jax.plots import plot_metrics  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/plots)")
    parser.add_argument("--keys", default="", help="comma-separated metric names to plot (default: all)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    for path in plot_metrics(args.workdir, args.out, keys or None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prepare the demo sweep's corpus: quickstart's synthetic grammar, binarised for masked_lm.

    python experiments/prepare_demo_data.py --out outputs/demo-data [--lines 1500] [--seed 1]

Reuses ``experiments/quickstart.py``'s ``make_data`` (a rerun with the same options is a no-op)
and prints the data-bin directory.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import make_data  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--lines", type=int, default=1500)
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
print(make_data(args.out.resolve(), args.lines, args.seed))

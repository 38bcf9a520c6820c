"""``python -m slurm`` = ``fairseq-sweep``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m nlmefit ...``: the command line (:mod:`nlmefit.cli`), e.g. under ``torchrun -m nlmefit``."""
from __future__ import annotations

import sys

from nlmefit.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m alignkern.examples.ica``: the same as ``alignkern demo ica``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m alignkern.examples.evidence``: the same as ``alignkern demo evidence``."""

import sys

from .cli import main

sys.exit(main())

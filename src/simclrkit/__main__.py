"""``python -m simclrkit`` runs the command line (also what torchrun launches)."""

import sys

from simclrkit.cli import main

sys.exit(main())

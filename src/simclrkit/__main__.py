"""``python -m simclrkit`` runs the command line (also what torchrun launches)."""

from simclrkit.cli import entry

entry()

"""`python -m santacli` runs the santa command line."""

from santacli.cli import entry

entry()

"""`python -m santacli` runs the santa command line."""

from santacli.cli.app import entry

entry()

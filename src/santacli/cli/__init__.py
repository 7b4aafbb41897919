"""The ``santa`` command line, a front end over :class:`santacli.completion.CompletionEngine`.

``app.py`` holds the Typer app, the entry point and the one table that turns exceptions into
messages and exit codes; ``options.py`` the options the commands share (and the engine they
load); ``output.py`` what completion commands print; one module per command. Import from the
modules themselves (``santacli.cli.app``); this package re-exports nothing.
"""

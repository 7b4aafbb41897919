"""``santa repl``, the interactive front end: ``session.py`` holds everything that is not a
terminal (``:commands``, option parsing, the working buffer, formatting) and ``ui.py`` the
prompt_toolkit + rich terminal UI and :func:`santacli.repl.ui.run`. This package re-exports
nothing; neither module imports torch.
"""

"""``santa lsp``: santa's completions for every editor that speaks the Language Server Protocol.

``server`` wires pygls to the handlers, ``documents`` keeps the editor's unsaved text and maps
LSP positions into it, ``worker`` runs completions on the one model thread (supersession,
cancellation, the time budget) and ``config`` reads the client's settings. The engine is handed
in by the CLI, like every front end's.
"""

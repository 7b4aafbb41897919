"""``santa serve``: the HTTP front end. ``app`` assembles and runs it, ``worker`` runs the
model, ``state`` and ``wire`` are the HTTP plumbing, and each ``routes_*`` module is one API.

``santacli.server.serve`` and ``santacli.server.create_app`` are the documented Python API.
"""

from __future__ import annotations

from santacli.server.app import create_app, serve

__all__ = ["create_app", "serve"]

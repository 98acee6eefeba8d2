"""The ``radfed`` command line: one module per user role (``researcher``, ``site``,
``central``), the output they share (``output``), and the app that joins them (``app``).

Commands parse arguments and call library functions that have their own tests; they do
nothing else.
"""

from radfed.cli.app import app, main

__all__ = ["app", "main"]

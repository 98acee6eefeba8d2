"""``python -m radfed``: the same as the ``radfed`` command."""

from radfed.cli import main

main()

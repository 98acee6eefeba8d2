"""Flower ClientApp: a site's local training and evaluation (radfed.site.app).

At a deployed site this file never runs: the site answers with the radfed it installed
(radfed.site.runtime). It is the app of `radfed simulate` and `flwr run` on one machine.
"""

from radfed.site.app import app

__all__ = ["app"]

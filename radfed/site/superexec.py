"""The site's SuperExec process (``radfed site join`` starts it): Flower's, taking ClientApp
tasks only, which it runs with the site's own ``flwr-clientapp`` (radfed.site.runtime).

Started as ``python -P -m radfed.deployment.site_superexec`` with ``flower-superexec``'s
arguments; see ``radfed.flower_private.site_exec_plugin``.
"""

from __future__ import annotations

from radfed.flower_private import run_site_superexec

__all__ = ["main"]


def main() -> None:
    """Entry point of the site's SuperExec process."""
    run_site_superexec()


if __name__ == "__main__":
    main()

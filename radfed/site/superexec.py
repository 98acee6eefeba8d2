"""The site's SuperExec process (``radfed site join`` starts it): Flower's, taking ClientApp
tasks only, which it runs with the site's own ``flwr-clientapp`` (radfed.site.runtime),
forked from a warm process that has imported torch and radfed once (radfed.site.warm).

Started as ``python -P -m radfed.site.superexec`` with ``flower-superexec``'s arguments; see
``radfed.flower_private.run_site_superexec``. ``RADFED_WARM_TASKS=0`` starts every task as a
fresh process, as Flower does.
"""

from __future__ import annotations

import os

from radfed.flower_private import log_like_flower, run_site_superexec
from radfed.site.warm import WARM_TASKS_ENV, WarmStarter

__all__ = ["main"]


def main() -> None:
    """Entry point of the site's SuperExec process."""
    log_like_flower()
    warm = os.environ.get(WARM_TASKS_ENV, "1").strip() != "0"
    starter = WarmStarter() if warm else None
    if starter is not None:
        starter.check()  # imports while the SuperExec waits for its first task
    run_site_superexec(starter)


if __name__ == "__main__":
    main()

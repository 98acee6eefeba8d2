"""The error of a request the site policy refuses."""

from __future__ import annotations

from radfed.errors import RadfedError

__all__ = ["PolicyRefusal"]


class PolicyRefusal(RadfedError):
    """The site policy forbids what the run asks; the message names the policy key."""

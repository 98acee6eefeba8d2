"""How failures cross the wire: the error codes a site replies with, and a bad reply's error.

A site never sends exception text (it may quote a header value or a path): it replies with
one of these codes, and its own log says more. The server drops a reply that breaks the
contract with an ``InvalidReply`` naming what is wrong, never quoting the content.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "InvalidReply", "describe_code"]


class InvalidReply(ValueError):
    """A site's reply breaks the contract; the message names what, never the content."""


class ErrorCode(IntEnum):
    """Codes a site replies with instead of exception text (radfed's band: 3000-3099).

    Each member carries ``help``: one line for the central team on what happened and
    where to look.
    """

    help: str

    def __new__(cls, value: int, help_line: str) -> ErrorCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.help = help_line
        return member

    CONFIG = (
        3001,
        "the run's settings do not fit this site; the site's log names the setting",
    )
    DATA = (
        3002,
        "the site's data cannot be used; its administrator runs `radfed site check`",
    )
    RADFED = (
        3003,
        "radfed at the site could not complete the reply (for example, its audit log "
        "could not record it, so nothing left)",
    )
    HELD_OUT = (
        3004,
        "this site is the run's held-out site: it evaluates but never trains",
    )
    POLICY = (
        3005,
        "the site's policy refuses what the run asks (task, subgroups or message size)",
    )
    BUNDLE = (
        3006,
        "the site's policy does not take part in runs of this app bundle (publisher, name, "
        "version or digest); its log says which it accepts",
    )
    LIMIT = (
        3007,
        "the run asks more compute, memory or disk than the site's policy allows (image size, "
        "batch size, steps, workers, rounds or model size); the site's log names the limit",
    )
    UNEXPECTED = (
        3099,
        "an unexpected error at the site; its log names the exception type and line",
    )


def describe_code(code: int) -> str:
    """The help line of a site's error code; Flower's own codes are said to be Flower's."""
    for member in ErrorCode:
        if member == code:
            return member.help
    return "not a radfed code: Flower's own (see the site's SuperNode log)"

"""Who may read the dashboard: loopback only without a token, else the token on every request.

Without a token the dashboard answers only requests whose ``Host`` is a loopback name (so that
a web page elsewhere cannot read it through DNS rebinding). With a token every request carries
it: ``Authorization: Bearer TOKEN``, or a cookie that the first page load sets when it comes
with ``?token=TOKEN``. The cookie holds a keyed digest of the token, not the token itself.
Every response gets the security headers; the dashboard answers only GET and HEAD.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse

from radfed.dashboard.pages import message_page
from radfed.errors import ConfigError

__all__ = [
    "COOKIE_NAME",
    "DASHBOARD_CSP",
    "MIN_TOKEN_LENGTH",
    "TOKEN_ENV",
    "AccessGuard",
    "check_token",
    "is_loopback",
    "secure_headers",
]

#: Environment variable the command line reads the token from (``radfed dashboard --token``).
TOKEN_ENV = "RADFED_DASHBOARD_TOKEN"
#: The cookie that carries the session after a page load with ``?token=``.
COOKIE_NAME = "radfed_dashboard"
#: The shortest token accepted: a guessable token protects nothing.
MIN_TOKEN_LENGTH = 16
#: The dashboard's pages load only their own scripts, styles and API.
DASHBOARD_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

_ALLOWED_METHODS = ("GET", "HEAD")
_TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + string.punctuation)
_MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

Handler = Callable[[Request], Awaitable[Response]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, IPv6 with or without brackets) is this machine
    only: ``localhost``, 127.0.0.0/8 or ::1."""
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_token(token: str | None) -> str | None:
    """The token if it is usable (None: no token).

    Raises:
        ConfigError: the token is shorter than ``MIN_TOKEN_LENGTH`` or holds characters other
            than printable ASCII without spaces. The message never shows the token.
    """
    if token is None:
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        msg = (
            f"the dashboard token has {len(token)} characters; give one of at least "
            f"{MIN_TOKEN_LENGTH}, e.g. made by {_MAKE_TOKEN}"
        )
        raise ConfigError(msg)
    if not set(token) <= _TOKEN_CHARACTERS:
        msg = (
            "the dashboard token holds spaces or characters other than printable ASCII; "
            f"give letters, digits and punctuation only, e.g. made by {_MAKE_TOKEN}"
        )
        raise ConfigError(msg)
    return token


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _host_name(header: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8765`` -> ``[::1]``)."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _is_page(request: Request) -> bool:
    return not _is_api(request) and not request.url.path.startswith("/static/")


@dataclass(frozen=True)
class AccessGuard:
    """The middleware that decides who is answered, and adds the security headers.

    Attributes:
        token: the token every request must carry, or None (then loopback hosts only).
    """

    token: str | None = None

    @property
    def _session(self) -> str:
        """The cookie's value: a digest keyed by the token (the token never sits in a cookie)."""
        assert self.token is not None
        key = self.token.encode()
        return hmac.new(key, b"radfed-dashboard-session", hashlib.sha256).hexdigest()

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        refused = self._refusal(request)
        if refused is None and self._query_token_accepted(request):
            # the same page without the token, so that it leaves no trace in the address
            # bar, the history or a bookmark; the cookie carries the session from here on
            kept = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response: Response = RedirectResponse(
                request.url.replace(query=urlencode(kept)), status_code=303
            )
            response.set_cookie(
                COOKIE_NAME,
                self._session,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        else:
            response = refused if refused is not None else await call_next(request)
        secure_headers(request, response)
        return response

    def _refusal(self, request: Request) -> Response | None:
        """The response that refuses ``request``, or None when it may be answered."""
        if request.method not in _ALLOWED_METHODS:
            return PlainTextResponse(
                "the dashboard is read-only: GET and HEAD only",
                status_code=405,
                headers={"Allow": ", ".join(_ALLOWED_METHODS)},
            )
        if self.token is None:
            host = _host_name(request.headers.get("host", ""))
            if is_loopback(host):
                return None
            message = (
                "This dashboard has no token, so it answers only requests addressed to this "
                "machine (localhost, 127.0.0.1, ::1). To read it from elsewhere, start it "
                f"with a token (--token or {TOKEN_ENV})."
            )
            return _refuse(request, 400, "Host not allowed", message)
        if self._authorised(request):
            return None
        message = (
            "This dashboard needs its token: open it once with ?token=TOKEN added to the "
            "address, or send the header 'Authorization: Bearer TOKEN'."
        )
        response = _refuse(request, 401, "Token required", message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="radfed dashboard"'
        return response

    def _authorised(self, request: Request) -> bool:
        assert self.token is not None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(credentials.strip(), self.token):
            return True
        cookie = request.cookies.get(COOKIE_NAME)
        if cookie is not None and _same(cookie, self._session):
            return True
        given = request.query_params.get("token")  # pages only: API calls send the header
        return _is_page(request) and given is not None and _same(given, self.token)

    def _query_token_accepted(self, request: Request) -> bool:
        """A page loaded with the right ``?token=``: it gets the session cookie."""
        given = request.query_params.get("token")
        return (
            self.token is not None
            and given is not None
            and _is_page(request)
            and _same(given, self.token)
        )


def _refuse(request: Request, status: int, title: str, message: str) -> Response:
    if _is_api(request):
        return JSONResponse({"error": message}, status_code=status)
    return message_page(title, message, status_code=status)


def secure_headers(request: Request, response: Response) -> None:
    """The headers every response carries; a route's own CSP (the report's) is kept."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", DASHBOARD_CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    static = request.url.path.startswith("/static/")
    headers["Cache-Control"] = "no-cache" if static else "no-store"

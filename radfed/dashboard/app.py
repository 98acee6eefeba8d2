"""The dashboard's web app: pages, the JSON API they poll, and ``serve`` to run it.

Routes (GET and HEAD only):

- ``/``: the runs; ``/runs/{run}``: one run (curves, cross-site table, site status, bias
  verdicts, event log); ``/runs/{run}/report``: the run's full HTML bias report.
- ``/api/runs``, ``/api/runs/{run}``, ``/api/runs/{run}/events?after=SEQ&limit=N`` and
  ``/api/runs/{run}/curves?split=S&metric=M``: the same facts as JSON.

``{run}`` is anything ``radfed.store.find_run`` accepts: an id, a unique id prefix, a run
folder's name.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from radfed.dashboard.access import (
    TOKEN_ENV,
    AccessGuard,
    check_token,
    is_loopback,
    secure_headers,
)
from radfed.dashboard.pages import message_page, render
from radfed.errors import ConfigError
from radfed.log import logger
from radfed.store import (
    find_run,
    list_runs,
    open_store,
    report_html,
    run_curves,
    run_detail,
    run_events,
    shown_url,
)
from radfed.store.engine import head_revision, migrate, revision_of

__all__ = ["REPORT_CSP", "create_app", "serve"]

#: The stored bias report: inline styles and embedded figures, nothing else, no script.
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; sandbox"
)
#: The most events one API call returns.
MAX_EVENTS = 1000

#: The largest event sequence number a request may name (a signed 64-bit integer).
_MAX_SEQUENCE = 2**63 - 1
_GET = ["GET", "HEAD"]
_STATIC = Path(__file__).with_name("static")


class _UnknownRun(Exception):
    """A run reference that names no run (the message says which)."""


class _Json(JSONResponse):
    """JSON with non-finite numbers written as null (strict JSON has no NaN)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            _finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def create_app(engine: Engine, *, token: str | None = None) -> FastAPI:
    """The dashboard over the store ``engine``.

    Args:
        engine: an open store (``radfed.store.open_store``); the app only reads it.
        token: the token every request must carry (see ``radfed.dashboard.access``); None:
            no token, and only requests addressed to a loopback name are answered.

    Raises:
        ConfigError: the token is too short or holds unusable characters.
    """
    guard = AccessGuard(token=check_token(token))
    app = FastAPI(title="radfed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BaseHTTPMiddleware, dispatch=guard)
    app.mount("/static", StaticFiles(directory=_STATIC), name="static")

    def resolve(ref: str) -> str:
        try:
            return find_run(engine, ref)
        except ConfigError as err:
            raise _UnknownRun(str(err)) from None

    @app.api_route("/", methods=_GET, response_class=HTMLResponse)
    def runs_page() -> Response:
        return render("runs.html")

    @app.api_route("/runs/{ref}", methods=_GET, response_class=HTMLResponse)
    def run_page(ref: str) -> Response:
        run_id = resolve(ref)
        if run_id != ref:  # a prefix or a folder name: show the run at its own address
            return RedirectResponse(f"/runs/{quote(run_id, safe='')}", status_code=307)
        return render("run.html", run_id=run_id)

    @app.api_route("/runs/{ref}/report", methods=_GET, response_class=HTMLResponse)
    def report_page(ref: str) -> Response:
        document = report_html(engine, resolve(ref))
        if document is None:
            return message_page(
                "No report yet",
                "This run has no HTML bias report yet: the server writes it when the run "
                "ends. The run's page shows the latest verdicts meanwhile.",
                status_code=404,
            )
        return HTMLResponse(document, headers={"Content-Security-Policy": REPORT_CSP})

    @app.api_route("/api/runs", methods=_GET)
    def api_runs() -> Response:
        return _Json(list_runs(engine))

    @app.api_route("/api/runs/{ref}", methods=_GET)
    def api_run(ref: str) -> Response:
        return _Json(run_detail(engine, resolve(ref)))

    @app.api_route("/api/runs/{ref}/events", methods=_GET)
    def api_events(
        ref: str,
        after: int = Query(
            -1, ge=-1, le=_MAX_SEQUENCE, description="sequence number of the last event held"
        ),
        limit: int = Query(200, ge=1, le=MAX_EVENTS),
    ) -> Response:
        return _Json(run_events(engine, resolve(ref), after=after, limit=limit))

    @app.api_route("/api/runs/{ref}/curves", methods=_GET)
    def api_curves(
        ref: str,
        split: str = Query(..., max_length=16),
        metric: str = Query(..., max_length=64),
    ) -> Response:
        return _Json(run_curves(engine, resolve(ref), split=split, metric=metric))

    _add_error_pages(app)
    return app


def _add_error_pages(app: FastAPI) -> None:
    """Unknown runs and paths: 404; a store that fails: 503; never a traceback or SQL."""

    def reply(request: Request, status: int, title: str, message: str) -> Response:
        if request.url.path.startswith("/api/"):
            return _Json({"error": message}, status_code=status)
        return message_page(title, message, status_code=status)

    @app.exception_handler(_UnknownRun)
    async def unknown_run(request: Request, err: _UnknownRun) -> Response:
        return reply(request, 404, "No such run", str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        if err.status_code == 404:
            return reply(request, 404, "Not found", "There is nothing at this address.")
        return reply(request, err.status_code, "Request refused", str(err.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> Response:
        # Starlette answers this outside the middleware: the security headers are added here
        logger.error("dashboard: %s while answering a request", type(err).__name__)
        message = "The dashboard could not answer this request."
        response = reply(request, 500, "Internal error", message)
        secure_headers(request, response)
        return response

    @app.exception_handler(SQLAlchemyError)
    async def store_error(request: Request, err: SQLAlchemyError) -> Response:
        logger.warning("dashboard: the run store failed (%s)", type(err).__name__)
        message = "The run store is not answering right now; try again in a moment."
        return reply(request, 503, "Store unavailable", message)


def serve(url: str, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Open the store at ``url`` and serve the dashboard until interrupted.

    Args:
        url: the run store's SQLAlchemy URL.
        host: the address to listen on; beyond loopback (127.0.0.0/8, ::1, localhost) a
            token is required.
        port: the TCP port.
        token: the token every request must carry (see ``create_app``).

    Raises:
        ConfigError: no token for a non-loopback address, an unusable token or port, or a
            store that cannot be opened.
    """
    token = check_token(token)
    if token is None and not is_loopback(host):
        msg = (
            f"the dashboard would listen on {host!r}, beyond this machine, without a token: "
            f"anyone who can reach {host}:{port} could read every run's sites, metrics and "
            f"bias verdicts; a token is required (--token or {TOKEN_ENV}), or listen on "
            "127.0.0.1 and reach it through an SSH tunnel"
        )
        raise ConfigError(msg)
    if not 0 < port < 65536:
        raise ConfigError(f"the dashboard port {port!r} is not a TCP port; give 1 to 65535")
    _check_free(host, port)
    engine = _open(url)
    app = create_app(engine, token=token)
    address = f"[{host}]" if ":" in host else host
    logger.info(
        "dashboard of the store %s on http://%s:%d (%s)",
        shown_url(url),
        address,
        port,
        "every request must carry the token"
        if token
        else "no token: answers requests to this machine only",
    )
    try:
        # No access log: a first page load's address holds the token (?token=).
        uvicorn.run(
            app,
            host=host,
            port=port,
            access_log=False,
            log_config=None,
            server_header=False,
        )
    finally:
        engine.dispose()


def _check_free(host: str, port: int) -> None:
    """Fail early, with the fix, where the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ConfigError(f"cannot listen on {host!r}: no such address or name") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            msg = (
                f"cannot listen on {host}:{port} ({err.strerror}); another program may hold "
                "the port: give another --port"
            )
            raise ConfigError(msg) from None


def _open(url: str) -> Engine:
    """The store at ``url``, its schema brought to this radfed's revision if it is behind."""
    engine = open_store(url, upgrade=False)
    try:
        if revision_of(engine) != head_revision():
            migrate(engine)
    except SQLAlchemyError as err:
        engine.dispose()
        msg = (
            f"the run store {shown_url(url)} cannot be read ({type(err).__name__}); check that "
            "its server is running, the URL, and that the schema is current "
            "(`radfed store upgrade --store URL` with a role that may write)"
        )
        raise ConfigError(msg) from None
    return engine

"""The dashboard's HTML pages: package templates with every inserted value escaped.

The pages are shells: their scripts (``static/``) fetch the facts from the JSON API and write
them with ``textContent``, so that no text from the store is ever parsed as HTML. The server
inserts only a few values (a run id, a message), escaped here.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from string import Template

from fastapi.responses import HTMLResponse

__all__ = ["message_page", "render"]


@cache
def _template(name: str) -> Template:
    text = resources.files("radfed.dashboard").joinpath("templates", name).read_text("utf-8")
    return Template(text)


def render(name: str, *, status_code: int = 200, **values: str) -> HTMLResponse:
    """The template ``templates/NAME`` with ``$key`` replaced by each value, HTML-escaped."""
    escaped = {key: html.escape(value, quote=True) for key, value in values.items()}
    return HTMLResponse(_template(name).substitute(escaped), status_code=status_code)


def message_page(title: str, message: str, *, status_code: int) -> HTMLResponse:
    """A page that says what went wrong and links back to the runs."""
    return render("message.html", status_code=status_code, title=title, message=message)

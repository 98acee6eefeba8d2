"""The dashboard end to end: real simulated runs fill a store, ``radfed dashboard`` serves it,
and headless Chromium reads it as a person would, while a second run is still going."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from radfed.data.synth import synth_sites
from tests.e2e.processes import Background, run_simulate
from tests.services import unavailable

#: Ray-backed simulations run one at a time, on one pytest-xdist worker.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ray")]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SITES = {"site-a", "site-b", "site-c"}
#: The settings of tests/e2e/test_bias.py under which ``--bias contrast`` is reliably flagged.
CASES_PER_SITE, SEED, ROUNDS = 800, 11, 4
BIAS_RUN_CONFIG = "val-fraction=0.4 test-fraction=0.1 local-epochs=2"
#: The run that is read while it goes: small, quick rounds, enough of them to see it advance.
LIVE_CASES, LIVE_ROUNDS = 60, 6
_CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--window-size=1400,1000",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_until_served(server: Background, base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get_json(f"{base}/api/runs")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if server.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the dashboard did not answer:\n{server.output()}") from None
            time.sleep(0.3)


def _wait_for_run(base: str, name: str, timeout: float) -> dict[str, Any]:
    """The run called ``name`` once the store has it (and a round is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in _get_json(f"{base}/api/runs"):
            if run["name"] == name:
                found: dict[str, Any] = run
                return found
        time.sleep(0.5)
    raise AssertionError(f"no run {name!r} in the store after {timeout:.0f} s")


@contextmanager
def _chromium(profile: Path) -> Iterator[Any]:
    """Headless Chromium from the OS packages, logging every network request it makes."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        unavailable(
            f"{' and '.join(missing)} not found: the dashboard's browser test needs Debian's "
            "`apt-get install chromium chromium-driver`"
        )
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*_CHROME_ARGS, f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = None
    try:
        # Service with a path: Selenium Manager never looks for (or downloads) a driver.
        driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER)), options=options
        )
    except WebDriverException as err:
        reason = str(err).strip().splitlines()[0]
    if driver is None:
        unavailable(f"headless Chromium does not start here: {reason}")
    try:
        yield driver
    finally:
        driver.quit()


def _requested_urls(driver: Any) -> list[str]:
    """The URLs of the requests the page made since the last call (the log is drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(str(message["params"]["request"]["url"]))
    return urls


def _text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def _wait(driver: Any, timeout: float, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, message=what)


def _loaded_images(driver: Any) -> int:
    """How many of the page's images loaded (their natural width is known)."""
    return int(
        driver.execute_script(
            "return [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length;"
        )
    )


def test_the_dashboard_shows_runs_sites_curves_gaps_and_a_run_in_progress(
    tmp_path: Path,
) -> None:
    # Prepare: the browser first (a missing one skips before the slow part), then the data
    profile = Path(tempfile.mkdtemp(prefix="radfed-chromium-"))
    store = f"sqlite:///{tmp_path / 'store.sqlite'}"
    env = {"RADFED_STORE": store}
    flagged_data, live_data = tmp_path / "flagged-data", tmp_path / "live-data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    live: Background | None = None
    server = Background(
        tmp_path / "dashboard.log", "dashboard", "--store", store, "--port", str(port), env=env
    )
    try:
        with _chromium(profile) as driver:
            from selenium.webdriver.common.by import By

            _wait_until_served(server, base)
            synth_sites(
                flagged_data, sites=3, cases_per_site=CASES_PER_SITE, seed=SEED, bias="contrast"
            )
            synth_sites(live_data, sites=3, cases_per_site=LIVE_CASES, seed=SEED)
            run_simulate(
                tmp_path / "flwr-home",
                "--data",
                str(flagged_data),
                "--out",
                str(tmp_path / "flagged"),
                "--rounds",
                str(ROUNDS),
                "--seed",
                str(SEED),
                "--run-config",
                BIAS_RUN_CONFIG,
                env=env,
            )
            # the second run goes on while the browser reads the first
            live = Background(
                tmp_path / "live.log",
                "simulate",
                "--data",
                str(live_data),
                "--out",
                str(tmp_path / "live"),
                "--rounds",
                str(LIVE_ROUNDS),
                "--seed",
                str(SEED),
                "--run-config",
                "local-epochs=1",
                env={
                    **env,
                    "FLWR_HOME": str(tmp_path / "flwr-home-live"),
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
                },
            )

            # Execute and assert (c): the runs page lists the run; its page shows it whole
            driver.get("about:blank")
            _requested_urls(driver)  # drained: the browser's own start page is not ours
            driver.get(base + "/")
            link = _wait(
                driver,
                20,
                lambda d: d.find_elements(By.LINK_TEXT, "flagged"),
                "the runs page does not list the run",
            )[0]
            row = _text(driver, "#runs tbody tr[data-run-id]")
            assert "finished" in row and f"{ROUNDS} / {ROUNDS}" in row and "flagged" in row
            link.click()
            _wait(
                driver,
                20,
                lambda d: d.find_elements(By.CSS_SELECTOR, "#sites tbody tr[data-site]"),
                "the run page shows no sites",
            )
            assert _text(driver, "#run-name") == "flagged"
            sites = {
                e.get_attribute("data-site")
                for e in driver.find_elements(By.CSS_SELECTOR, "#sites tbody tr[data-site]")
            }
            assert sites == SITES
            latest = {
                e.get_attribute("data-site")
                for e in driver.find_elements(By.CSS_SELECTOR, "#latest tbody tr[data-site]")
            }
            assert latest == {*SITES, "ALL"}
            curves = driver.find_elements(By.CSS_SELECTOR, "#chart svg path.series")
            points = driver.find_elements(By.CSS_SELECTOR, "#chart svg circle.point")
            assert len(curves) == len(SITES) + 1
            assert len(points) == (len(SITES) + 1) * ROUNDS
            flagged_chip = _text(driver, "#verdicts .verdict.flagged .count")
            assert int(flagged_chip) > 0
            assert "beyond chance" in _text(driver, "#verdict-text")
            flagged_rows = driver.find_elements(By.CSS_SELECTOR, "#gaps tbody tr.flagged")
            assert flagged_rows and any("site-b" in r.text for r in flagged_rows)
            assert "round" in _text(driver, "#events tbody")

            # (e) a screenshot of the whole page
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1400, int(height) + 120)
            screenshot = tmp_path / "dashboard-run.png"
            assert driver.save_screenshot(str(screenshot))
            print(f"dashboard screenshot: {screenshot}")
            driver.set_window_size(1400, 1000)

            # the full report opens under its own strict policy, scripts and styles intact
            driver.find_element(By.ID, "report-link").click()
            _wait(driver, 20, lambda d: "bias report" in d.title, "the report does not open")
            assert _loaded_images(driver) > 0, "the report's figures do not show"
            urls = _requested_urls(driver)

            # (d) the run in progress advances on its page without a reload
            run = _wait_for_run(base, "live", timeout=120)
            driver.get(f"{base}/runs/{run['id']}")
            driver.execute_script("window.radfedNoReload = true;")
            _wait(
                driver,
                20,
                lambda d: _text(d, "#rounds-done").isdigit(),
                "the live run's page shows no round count",
            )
            first = int(_text(driver, "#rounds-done"))
            assert first < LIVE_ROUNDS, "the second run ended before its page was read"
            _wait(
                driver,
                180,
                lambda d: int(_text(d, "#rounds-done")) > first,
                "the live run's round count did not advance on the page",
            )
            assert driver.execute_script("return window.radfedNoReload === true;")
            urls += _requested_urls(driver)
            console = driver.get_log("browser")

        # (f) the browser asked nothing of any host but the dashboard
        assert any(u.startswith(f"{base}/api/runs") for u in urls)
        foreign = [u for u in urls if not (u.startswith(base + "/") or u.startswith("data:"))]
        assert not foreign, f"requests to other hosts: {foreign}"
        problems = [e["message"] for e in console if e["level"] == "SEVERE"]
        assert not problems, f"browser console errors (CSP violations included): {problems}"
    finally:
        if live is not None:
            live.stop()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)

"""The dashboard in headless Chromium against a real coordinator and agents (no network)."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, require_binary, wait_until

pytestmark = pytest.mark.slow

TOKEN = "dash-admin-token"
DOCS = Path(__file__).resolve().parents[2] / "docs"
FAST = """
[detection]
healthy_interval = "1s"
unhealthy_interval = "250ms"
timeout = "500ms"
connect_timeout = "250ms"
startup_grace = "0"

[agent]
sample_interval = "1s"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=FAST, env={"NODEWATCH_ADMIN_TOKEN": TOKEN}) as c:
        c.start_coordinator()
        for i in range(1, 4):
            host = f"127.0.5.{i}"
            c.start_agent(f"web-{i}", f"{host}:{free_port(host)}")
        wait_until(lambda: len(c.nodes()) == 3 and all(n["health"] == "healthy"
                                                       for n in c.nodes()),
                   timeout=20, message="three healthy nodes")
        yield c


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = require_binary("chromium")
    driver_path = require_binary("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory(prefix="nodewatch-chromium-") as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1400,1000",
                     f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def cell(browser: Any, node_id: str, column: str) -> str:
    """A cell of the live table, "" while its row is being redrawn: read it inside a wait."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(browser.find_element(
            "css selector", f'tr[data-node="{node_id}"] td.{column}').text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def click(browser: Any, selector: str) -> None:
    """Click a button of the live table; a row redrawn between finding and clicking is found
    again (the table refreshes every second)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt() -> bool:
        try:
            browser.find_element("css selector", selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_until(attempt, timeout=10, message=f"a click on {selector}")


def cpu_points(browser: Any, node_id: str) -> list[str]:
    """The points of a node's CPU line; the chart is redrawn live, so a stale one reads as
    empty and the caller's wait simply tries again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        line = browser.find_element("css selector", f'.chart[data-node="{node_id}"] polyline.cpu')
        return str(line.get_attribute("points") or "").split()
    except (NoSuchElementException, StaleElementReferenceException):
        return []


def test_dashboard_drain_asks_for_token_and_the_row_changes(
    cluster: LocalCluster, browser: Any, tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    set_qps(cluster, {"web-1": 40, "web-2": 120, "web-3": 75})
    browser.get(f"{cluster.url}/")
    wait_until(lambda: all(cell(browser, f"web-{i}", "health") == "healthy"
                           for i in range(1, 4)), timeout=15, message="three healthy rows")
    assert "3 nodes" in browser.find_element("id", "summary").text

    click(browser, 'tr[data-node="web-2"] button[data-action="drain"]')

    def alert() -> Any:
        try:
            return browser.switch_to.alert
        except NoAlertPresentException:
            return None

    prompt = wait_until(alert, timeout=10, message="the token prompt after a 401")
    prompt.send_keys(TOKEN)  # type: ignore[attr-defined]
    prompt.accept()  # type: ignore[attr-defined]

    wait_until(lambda: cell(browser, "web-2", "admin") == "drained", timeout=10,
               message="web-2 row shows drained")
    wait_until(lambda: cell(browser, "web-2", "schedulable") == "no", timeout=10,
               message="web-2 schedulable shows no")
    wait_until(lambda: cell(browser, "web-1", "admin") == "active", timeout=10,
               message="web-1 admin shows active")
    node = cluster.node("web-2")
    assert node is not None and node["admin"] == "drained"
    assert browser.execute_script(
        "return sessionStorage.getItem('nodewatch.adminToken')") == TOKEN

    # The live timeline got the event over SSE, and the charts drew the history.
    wait_until(lambda: browser.find_elements(
        "css selector", '#events li[data-kind="drained"]'), timeout=10,
        message="drained event in the timeline")
    wait_until(lambda: all(len(cpu_points(browser, f"web-{i}")) >= 2 for i in range(1, 4)),
               timeout=15, message="cpu lines with at least two points for every node")

    # Undrain with the remembered token: no second prompt.
    click(browser, 'tr[data-node="web-2"] button[data-action="undrain"]')
    wait_until(lambda: cell(browser, "web-2", "admin") == "active", timeout=10,
               message="web-2 row back to active")
    assert alert() is None

    # Everything the page loaded came from the coordinator itself: no CDN, no network.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {cluster.url}

    # For the picture in the README: one drained node, one hung node, changing load.
    set_qps(cluster, {"web-1": 90, "web-2": 60, "web-3": 20})
    http_json(f"{cluster.url}/v1/nodes/web-3/drain", "POST", {"reason": "maintenance"},
              token=TOKEN)
    cluster.agents["web-1"].signal(signal.SIGSTOP)
    try:
        wait_until(lambda: cell(browser, "web-1", "health") == "unhealthy", timeout=10,
                   message="hung web-1 shown unhealthy")
        wait_until(lambda: browser.find_elements(
            "css selector", '.chart[data-node="web-1"] rect.outage'), timeout=10,
            message="the outage shaded on web-1's chart")
        wait_until(lambda: cell(browser, "web-3", "admin") == "drained", timeout=10,
                   message="web-3 admin shows drained")
        screenshot(browser, tmp_path)
    finally:
        cluster.agents["web-1"].signal(signal.SIGCONT)


def set_qps(cluster: LocalCluster, qps: dict[str, float]) -> None:
    for node_id, value in qps.items():
        status, _ = http_json(f"http://{cluster.agents[node_id].address}/metrics/load", "PUT",
                              {"qps": value, "pending_tasks": value // 10})
        assert status == 200


def screenshot(browser: Any, tmp_dir: Path) -> None:
    """Take the README's picture; it replaces docs/dashboard.png only when asked
    (NODEWATCH_UPDATE_SCREENSHOT=1), so that a test run never dirties the work tree."""
    shot = tmp_dir / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("NODEWATCH_UPDATE_SCREENSHOT") == "1":
        os.replace(shot, DOCS / "dashboard.png")


def test_dashboard_assets_are_served_from_the_package(cluster: LocalCluster) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{cluster.url}/", timeout=5) as resp:
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
    assert "/static/dashboard.js" in page and "http" not in page.split("<footer")[0]
    for asset in ("dashboard.js", "dashboard.css"):
        with urllib.request.urlopen(f"{cluster.url}/static/{asset}", timeout=5) as resp:
            assert resp.status == 200 and b"http://" not in resp.read().replace(
                b"http://www.w3.org/2000/svg", b"")

"""The dashboard in headless Chromium against a real coordinator: with real agents (commands,
the token prompt, events, a node's page and its charts), and at fleet size with 300
nginx-served nodes (counts, attention, heatmap, filters, sorting, keys, incremental updates).
No network beyond the coordinator; no timing asserted beyond bounds that catch a hang."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from tests.helpers import free_port, require_binary, wait_until

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from dashboard_fleet import failing, fleet, labels  # noqa: E402
from dashboard_fleet import node_id as fleet_node_id  # noqa: E402

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
    """The points of the CPU line on a node's page; the chart is redrawn live, so a stale one
    reads as empty and the caller's wait simply tries again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        line = browser.find_element(
            "css selector", f'.chart[data-node="{node_id}"][data-metric="cpu"] polyline')
        return str(line.get_attribute("points") or "").split()
    except (NoSuchElementException, StaleElementReferenceException):
        return []


def text(browser: Any, selector: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(browser.find_element("css selector", selector).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def page_state(browser: Any, expression: str) -> Any:
    return browser.execute_script(f"return {expression}")


def test_dashboard_drain_asks_for_token_and_the_row_changes(
    cluster: LocalCluster, browser: Any
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

    # The live timeline got the event over SSE; a node's page draws its history.
    wait_until(lambda: browser.find_elements(
        "css selector", '#events li[data-kind="drained"]'), timeout=10,
        message="drained event in the timeline")
    click(browser, 'tr[data-node="web-2"] td.node a')
    wait_until(lambda: text(browser, "#node-title") == "web-2", timeout=10,
               message="web-2's page")
    wait_until(lambda: len(cpu_points(browser, "web-2")) >= 2, timeout=15,
               message="web-2's cpu line with at least two points")
    wait_until(lambda: browser.find_elements(
        "css selector", '#node-events li[data-kind="drained"]'), timeout=10,
        message="the drain among web-2's events")
    assert "drained" in text(browser, '#node-facts dd[data-fact="admin"]')
    browser.find_element("css selector", "body").send_keys("g")  # back to the fleet
    wait_until(lambda: cell(browser, "web-2", "admin") == "drained", timeout=10,
               message="the fleet view again")

    # Undrain with the remembered token: no second prompt.
    click(browser, 'tr[data-node="web-2"] button[data-action="undrain"]')
    wait_until(lambda: cell(browser, "web-2", "admin") == "active", timeout=10,
               message="web-2 row back to active")
    assert alert() is None

    # Everything the page loaded came from the coordinator itself: no CDN, no network.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {cluster.url}

    # A hung node: the row turns unhealthy by itself (events and changes, no reload), it
    # heads the attention list, and its page shades the outage and shows the evidence.
    cluster.agents["web-1"].signal(signal.SIGSTOP)
    try:
        wait_until(lambda: cell(browser, "web-1", "health") == "unhealthy", timeout=10,
                   message="hung web-1 shown unhealthy")
        wait_until(lambda: browser.find_elements(
            "css selector", '#attention li[data-node="web-1"]'), timeout=15,
            message="web-1 in the attention list")
        browser.get(f"{cluster.url}/#/node/web-1")
        wait_until(lambda: browser.find_elements(
            "css selector", '.chart[data-node="web-1"] rect.outage'), timeout=10,
            message="the outage shaded on web-1's chart")
        wait_until(lambda: browser.find_elements(
            "css selector", '#node-events li[data-kind="unhealthy"] details.evidence'),
            timeout=10, message="the unhealthy event with its evidence")
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


@pytest.fixture
def fleet_of_300(tmp_path: Path) -> Iterator[str]:
    require_binary("nginx")
    with fleet(300, tmp_path, interval="2s", admin_token=TOKEN,
               unhealthy_interval="300ms") as (url, _):
        bad = [fleet_node_id(i) for i in range(300) if failing(i)]
        wait_until(lambda: all((http_json(f"{url}/v1/nodes/{n}")[1] or {}).get("health")
                               == "unhealthy" for n in bad), timeout=30,
                   message="the failing nodes confirmed unhealthy")
        yield url


def test_fleet_view_filters_sorts_and_follows_changes_at_300_nodes(
    fleet_of_300: str, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    url = fleet_of_300
    bad = sorted(fleet_node_id(i) for i in range(300) if failing(i))
    browser.get(f"{url}/?page=70")  # five pages of 70: the page follows next_cursor
    wait_until(lambda: page_state(browser, "window.nodewatch.timings.allRows"), timeout=30,
               message="all rows loaded")
    assert page_state(browser, "window.nodewatch.state.rows.size") == 300
    # Counts, attention, heatmap groups.
    wait_until(lambda: text(browser, '.tile[data-count="total"] .count') == "300", timeout=10,
               message="the total tile")
    assert text(browser, '.tile[data-count="unhealthy"] .count') == str(len(bad))
    attention = wait_until(lambda: [li.get_attribute("data-node") for li in
                                    browser.find_elements("css selector", "#attention li")],
                           timeout=10, message="the attention list")
    assert sorted(attention) == bad  # type: ignore[arg-type]
    zones = {v["zone"] for v in (labels(i) for i in range(300))}
    groups = browser.find_elements("css selector", "#heatmap .heat-group")
    assert {g.get_attribute("data-group") for g in groups} == zones
    assert browser.find_elements("css selector", ".stack svg polygon")

    # The table is a virtual list: 300 rows held, a screenful drawn.
    drawn = browser.find_elements("css selector", "#nodes tbody tr.row")
    assert 10 < len(drawn) < 300

    def shown() -> list[str]:
        return list(page_state(browser, "window.nodewatch.state.visible.map(n => n.node_id)"))

    # "/" focuses the search; words narrow it.
    body = browser.find_element("css selector", "body")
    body.send_keys("/")
    search = browser.switch_to.active_element
    assert search.get_attribute("id") == "search"
    search.send_keys("node-0010")
    wait_until(lambda: shown() == [f"node-{i:05d}" for i in range(100, 110)], timeout=10,
               message="the search narrows the table")
    search.send_keys(Keys.ESCAPE)  # clears the search
    wait_until(lambda: len(shown()) == 300, timeout=10, message="the search cleared")
    # Health and label filters, and both at once.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "filter-health")).select_by_value("unhealthy")
    wait_until(lambda: sorted(shown()) == bad, timeout=10, message="only unhealthy nodes")
    Select(browser.find_element("id", "filter-label")).select_by_value("zone=z5")
    in_z5 = sorted(n for n in bad if labels(int(n.split("-")[1]))["zone"] == "z5")
    wait_until(lambda: sorted(shown()) == in_z5, timeout=10, message="unhealthy in zone z5")
    browser.find_element("id", "clear-filters").click()
    wait_until(lambda: len(shown()) == 300, timeout=10, message="filters cleared")
    # Sort by any column: cpu, highest first; again for lowest first.
    click(browser, 'button[data-sort="cpu"]')
    cpus = page_state(browser, "window.nodewatch.state.visible.map(n => n._cpu ?? -1)")
    assert cpus == sorted(cpus, reverse=True)
    click(browser, 'button[data-sort="cpu"]')
    cpus = page_state(browser, "window.nodewatch.state.visible.map(n => n._cpu ?? -1)")
    assert cpus == sorted(cpus)
    click(browser, 'button[data-sort="node_id"]')

    # Changes arrive incrementally: a drain shows without another full read of the list.
    full_reads = page_state(browser, "performance.getEntriesByType('resource').filter(e => "
                                     "e.name.includes('/v1/nodes?limit=')).length")
    status, _ = http_json(f"{url}/v1/nodes/node-00003/drain", "POST", {"reason": "test"},
                          token=TOKEN)
    assert status == 200
    wait_until(lambda: cell(browser, "node-00003", "admin") == "drained", timeout=10,
               message="the drain shows in the row")
    wait_until(lambda: page_state(browser, "performance.getEntriesByType('resource').filter("
                                           "e => e.name.includes('changed_since')).length"),
               timeout=10, message="changes read with changed_since")
    assert page_state(browser, "performance.getEntriesByType('resource').filter(e => "
                               "e.name.includes('/v1/nodes?limit=')).length") == full_reads
    wait_until(lambda: text(browser, '.tile[data-count="drained"] .count') == "1", timeout=15,
               message="the drained count")

    # A gray failure shows: callers report one healthy node failing (issue 15); its row gets
    # the outlier badge and it joins the attention list, while its health stays healthy.
    judged = [fleet_node_id(i) for i in range(300) if not failing(i)][:20]
    gray = judged[7]

    def report() -> bool:
        observations = [{"node_id": n, "requests": 200, "errors": 80 if n == gray else 0}
                        for n in judged]
        status, body = http_json(f"{url}/v1/observations", "POST",
                                 {"source": "lb-test", "observations": observations},
                                 token=TOKEN)
        assert status == 200, body
        return bool(browser.find_elements(
            "css selector", f'tr[data-node="{gray}"] .badge.w-outlier'))

    wait_until(report, timeout=30, interval=0.5, message="the outlier badge in the row")
    assert cell(browser, gray, "health").startswith("healthy")
    def in_attention() -> bool:
        from selenium.common.exceptions import StaleElementReferenceException

        try:  # the list is redrawn as changes arrive
            return gray in [li.get_attribute("data-node") for li in
                            browser.find_elements("css selector", "#attention li")]
        except StaleElementReferenceException:
            return False

    wait_until(in_attention, timeout=10, message="the outlier in the attention list")

    # Keyboard: j selects the first row, Enter opens its page, Escape goes back.
    body.send_keys("j")
    body.send_keys(Keys.ENTER)
    wait_until(lambda: text(browser, "#node-title") == "node-00000", timeout=10,
               message="node-00000's page from the keyboard")
    wait_until(lambda: browser.find_elements("css selector", "#node-events li"), timeout=10,
               message="its events")
    body.send_keys(Keys.ESCAPE)
    wait_until(lambda: not browser.find_element("id", "fleet-view").get_attribute("hidden"),
               timeout=10, message="back to the fleet")
    # A failing node's page: its facts, its events with evidence.
    browser.get(f"{url}/#/node/{bad[0]}")
    wait_until(lambda: "unhealthy" in text(browser, '#node-facts dd[data-fact="health"]'),
               timeout=10, message="the failing node's facts")
    wait_until(lambda: browser.find_elements(
        "css selector", '#node-events li[data-kind="unhealthy"] details.evidence'),
        timeout=10, message="its unhealthy event with evidence")
    # Everything came from the coordinator: no external assets.
    origins = page_state(browser, "performance.getEntriesByType('resource')"
                                  ".map(e => new URL(e.name).origin)")
    assert set(origins) <= {url}
    browser.get(f"{url}/")
    wait_until(lambda: page_state(browser, "window.nodewatch.timings.allRows"), timeout=30,
               message="the fleet view for the picture")
    wait_until(lambda: browser.find_elements("css selector", "#heatmap canvas"), timeout=10,
               message="the heatmap for the picture")
    screenshot(browser, tmp_path)

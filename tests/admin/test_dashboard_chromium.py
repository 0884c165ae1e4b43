"""The live dashboard in headless Chromium (Debian's chromium, driven by Selenium through
Debian's chromedriver: nothing is downloaded). Real processes: an Intermediate with
`--admin`, a Connector whose TCP backend is health-checked, an Agent. The page must show the
service and its Connector healthy, then — without a reload — the Connector unhealthy once its
backend is killed, and healthy again when a backend is back on the same port."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_world import TcpEcho, World, echo_roundtrip, free_port, wait_for

from ztna.certs import init_pki

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _texts(driver: object, selector: str) -> list[str]:
    """The text of every element matching `selector`, read in one script: the page redraws
    itself every second, so element handles kept across calls would go stale."""
    script = "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)"
    return list(driver.execute_script(script, selector))  # type: ignore[attr-defined]


def _health(driver: object, service: str) -> list[str]:
    return _texts(driver, f'tr[data-service="{service}"] .connector .health')


def test_dashboard_shows_the_service_and_a_connector_going_unhealthy(tmp_path: Path, browser: object) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    backend = TcpEcho()
    backend_port = backend.port
    world = World(tmp=tmp_path, pki=pki)
    admin_port = free_port(socket.SOCK_STREAM)
    fwd = free_port(socket.SOCK_STREAM)
    driver = browser
    try:
        world.intermediate("--admin", f"127.0.0.1:{admin_port}")
        world.connector("c1", [f"web=10.100.0.2;tcp:80=127.0.0.1:{backend_port}"])
        world.agent("a1", fwd)
        wait_for(lambda: (world.status("a1") or {}).get("services", [{}])[0].get("connector_up"), 40,
                 "agent sees the service up")
        data = os.urandom(64_000)
        assert echo_roundtrip(fwd, data) == data

        driver.get(f"http://127.0.0.1:{admin_port}/")  # type: ignore[attr-defined]
        wait_for(lambda: _health(driver, "web") == ["healthy"], 20, "the page shows web with a healthy Connector")
        assert _texts(driver, 'tr[data-service="web"] .service-name') == ["web"]
        (row,) = _texts(driver, 'tr[data-service="web"]')
        assert "connector" in row and "agent" in row
        assert _texts(driver, "#live") == ["live"]
        (conns,) = _texts(driver, "#connections")
        assert "agent.web.ztna" in conns and "relay" in conns
        (flows,) = _texts(driver, "#flows")
        assert "10.100.0.2:80" in flows
        driver.save_screenshot(str(tmp_path / "dashboard.png"))  # type: ignore[attr-defined]
        # A marker that a reload would wipe: the updates must arrive in this same page.
        driver.execute_script("window.__stillHere = 1")  # type: ignore[attr-defined]

        backend.close()
        wait_for(lambda: _health(driver, "web") == ["unhealthy"], 40, "the page shows the Connector unhealthy")
        assert driver.execute_script("return window.__stillHere") == 1  # type: ignore[attr-defined]
        driver.save_screenshot(str(tmp_path / "dashboard-unhealthy.png"))  # type: ignore[attr-defined]

        backend = TcpEcho(backend_port)
        wait_for(lambda: _health(driver, "web") == ["healthy"], 40, "the page shows the Connector healthy again")
        assert driver.execute_script("return window.__stillHere") == 1  # type: ignore[attr-defined]
        world.alive()
    finally:
        world.stop()
        backend.close()



def test_dashboard_off_loopback_asks_for_the_token(tmp_path: Path, browser: object) -> None:
    from selenium.webdriver.common.by import By

    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    token = "dashboard-token-0123456789abcdef"
    (tmp_path / "admin.token").write_text(token + "\n")
    world = World(tmp=tmp_path, pki=pki)
    admin_port = free_port(socket.SOCK_STREAM)
    driver = browser
    try:
        world.intermediate("--admin", f"0.0.0.0:{admin_port}", "--admin-token-file", str(tmp_path / "admin.token"))
        driver.get(f"http://127.0.0.1:{admin_port}/")  # type: ignore[attr-defined]
        wait_for(lambda: _texts(driver, "#live") == ["token required"], 20, "the page asks for the token")
        form = driver.find_element(By.ID, "token")  # type: ignore[attr-defined]
        form.send_keys("not-the-token-at-all")
        driver.find_element(By.CSS_SELECTOR, "#login button").click()  # type: ignore[attr-defined]
        wait_for(lambda: _texts(driver, "#login-error") == ["wrong token"], 20, "a wrong token is refused")
        form = driver.find_element(By.ID, "token")  # type: ignore[attr-defined]
        form.clear()
        form.send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()  # type: ignore[attr-defined]
        wait_for(lambda: _texts(driver, "#live") == ["live"], 20, "the page is live with the token")
        assert _texts(driver, "#services tbody") == ["no services registered"]
        world.alive()
    finally:
        world.stop()

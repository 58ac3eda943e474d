"""The status page in a real headless browser (Debian's chromium and
chromium-driver, driven by Selenium): a live call appears with its codecs,
its packet counts rise, and it goes away, all without a reload."""

import shutil

import pytest

from tests.integration.conftest import RELAY_A
from tests.integration.daemons import Call, free_tcp_port
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# SIP allows < and > in a Call-ID: the page must show them as text
CALL_ID = "<b>live</b>-call@example.com"
PAGE_TIMEOUT = 10.0

# What a user reads in the sessions table: one object a row.
READ_SESSIONS = """
return Array.from(document.querySelectorAll("#sessions tbody tr[data-call-id]")).map((row) => ({
  callId: row.dataset.callId,
  text: row.innerText,
  codecs: row.querySelector("td.codecs").textContent,
  packets: row.querySelector("td.packets").textContent,
}));
"""


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (make deps installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()


def caller_packets(row) -> int:
    """The caller's count of the page's "caller / callee" packets cell (1,234 / 1,230)."""
    return int(row["packets"].split("/")[0].replace(",", "").strip())


def test_the_status_page_shows_a_live_call_its_codecs_and_rising_packets_without_a_reload(cluster, browser):
    port = free_tcp_port()
    cluster.start_dispatcher(listen_metrics=f"127.0.0.1:{port}")
    cluster.start_relays([RELAY_A])
    with cluster.proxy() as proxy:
        call = Call(proxy, CALL_ID, caller_pt=0, callee_pt=8)
        try:
            call.exchange()
            browser.get(f"http://127.0.0.1:{port}/")
            browser.execute_script("window.notReloaded = true")

            def the_call_with_its_codecs():
                rows = [row for row in browser.execute_script(READ_SESSIONS) if row["callId"] == CALL_ID]
                return rows[0] if rows and rows[0]["codecs"] == "G711u / G711a" else None
            row = wait_for(the_call_with_its_codecs, timeout=PAGE_TIMEOUT, interval=0.2,
                           message="the call and its codecs on the page")
            assert row["text"].startswith(CALL_ID) and "sip:alice@example.com" in row["text"]
            assert "audio" in row["text"] and "active" in row["text"]
            assert browser.execute_script("return document.querySelector('#sessions tbody b') === null")
            relays = browser.find_element("id", "relays").text
            assert RELAY_A in relays and "active" in relays and "userspace" in relays
            first = caller_packets(row)

            def more_packets():
                call.caller.send(call.caller_facing)        # the call goes on while the page is watched
                call.callee.send(call.callee_facing)
                call.caller.drain(), call.callee.drain()
                rows = [row for row in browser.execute_script(READ_SESSIONS) if row["callId"] == CALL_ID]
                return rows and caller_packets(rows[0]) > first
            wait_for(more_packets, timeout=PAGE_TIMEOUT, interval=0.1, message="the packet count to rise")

            assert proxy.remove(CALL_ID) == "removed"
            wait_for(lambda: "No session." in browser.find_element("id", "sessions").text,
                     timeout=PAGE_TIMEOUT, interval=0.2, message="the call to leave the page")
            assert browser.execute_script("return window.notReloaded === true")
        finally:
            call.close()
    cluster.assert_alive()

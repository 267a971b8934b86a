"""A real dashboard server and a real headless Chromium for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--no-first-run",
                  "--window-size=1400,1000"]
# Words that only appear on the page when something went wrong.
ERROR_MARKERS = ("Traceback", "Exception:", "Error:", "StreamlitAPIException")


def browser_available() -> bool:
    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dashboard(env: dict[str, str] | None = None, timeout: float = 120):
    """Start `streamlit run app.py` on a free localhost port; yield its base URL; stop it afterwards."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"streamlit-{port}.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=os.environ | (env or {}), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"the dashboard did not start; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


@contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver, condition, what: str, timeout: float = 120, poll: float = 0.5):
    """Poll until `condition(body text)` holds and the script has finished (no status widget); fail on error text.
    The benchmark polls faster (`poll`) to time what a person waits for."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        body = body_text(driver)
        found = [marker for marker in ERROR_MARKERS if marker in body]
        assert not found, f"{what}: the page shows {found}:\n{body[:3000]}"
        if condition(body) and not driver.find_elements(By.CSS_SELECTOR, "[data-testid=stStatusWidget]"):
            return body
        assert time.monotonic() < deadline, f"{what} did not appear; the page shows:\n{body[:2000]}"
        time.sleep(poll)


def wait_for_text(driver, text: str, timeout: float = 120, poll: float = 0.5) -> str:
    return wait_for(driver, lambda body: text in body, repr(text), timeout, poll)


def wait_for_charts(driver, count: int, timeout: float = 60, poll: float = 0.5, settle: float = 1.0) -> None:
    """Wait until `count` plotly charts are drawn, then `settle` seconds so that plotly finishes before a screenshot."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while len(driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) < count:
        assert time.monotonic() < deadline, f"fewer than {count} charts rendered"
        time.sleep(poll)
    time.sleep(settle)


def open_page(driver, label: str, text: str, attempts: int = 3, poll: float = 0.5) -> str:
    """Click the sidebar link (same session, so the chosen model and the plan stay). A click that lands while the
    previous page is still re-rendering can be lost on a loaded machine: then click again."""
    from selenium.webdriver.common.by import By

    for attempt in range(attempts):
        link = next(a for a in driver.find_elements(By.CSS_SELECTOR, "[data-testid=stSidebarNav] a")
                    if a.text.strip().endswith(label))  # after the page's icon
        link.click()
        try:
            return wait_for_text(driver, text, timeout=60, poll=poll)
        except AssertionError:
            if attempt == attempts - 1:
                raise


def metric_value(body: str, label: str) -> str:
    """The value shown under the first metric whose label starts with `label`."""
    lines = body.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith(label)) + 1]


def average_bits(body: str) -> str:
    return metric_value(body, "Average bits")


def cut_texts(driver) -> list[str]:
    """Metric labels and values, and chosen options of select boxes, shown only in part (cut off, e.g. with "…"):
    an element of the text wider than its box."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=stMetricLabel], [data-testid=stMetricValue], "
        "[data-testid=stSelectbox] input')).filter(text => [text, ...text.querySelectorAll('*')].some(e => "
        "e.scrollWidth > e.clientWidth + 1 || e.scrollHeight > e.clientHeight + 1))"
        ".map(text => text.value || text.textContent)")


def scrolling_tables(driver) -> list[str]:
    """Data tables wider than their box, so that a column hides behind a horizontal scroll: their column names."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-testid=stDataFrame]')).filter(table => "
        "Array.from(table.querySelectorAll('.dvn-scroller')).some(e => e.scrollWidth > e.clientWidth + 1))"
        ".map(table => Array.from(table.querySelectorAll('th')).map(th => th.textContent).join(' | '))")


def titles_under_toolbars(driver) -> list[str]:
    """Chart titles that the chart's toolbar covers in part."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(g => { "
        "const title = g.querySelector('.gtitle'), bar = g.querySelector('.modebar'); if (!title || !bar) return false;"
        " const a = title.getBoundingClientRect(), b = bar.getBoundingClientRect(); return a.right > b.left && "
        "b.right > a.left && a.bottom > b.top && b.bottom > a.top; }).map(g => g.querySelector('.gtitle').textContent)")


def plotly_traces(driver) -> list[list[dict]]:
    """name, x, y of every trace of every plotly chart on the page, read from the charts as drawn (`_fullData` holds
    the arrays decoded from plotly's binary JSON)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot')).map(g => (g._fullData || []).map(t => "
        "({name: t.name || '', x: Array.from(t.x || []), y: Array.from(t.y || [])})))")


def full_page_screenshot(driver, path: Path, width: int = 1400) -> None:
    """The whole page in one image: the window is made as tall as Streamlit's scrolling main area, then restored."""
    height = driver.execute_script("return document.querySelector('[data-testid=stMain]').scrollHeight")
    before = driver.get_window_size()
    driver.set_window_size(width, int(height) + 40)
    time.sleep(1.5)  # plotly redraws to the new width
    driver.save_screenshot(str(path))
    driver.set_window_size(before["width"], before["height"])

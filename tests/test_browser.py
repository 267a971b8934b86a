"""End to end: the real dashboard in a real headless Chromium, every page, screenshots under test-artifacts/."""

import time

import pytest

from tests.browser import ARTIFACTS, ERROR_MARKERS, browser_available, chromium, dashboard

pytestmark = pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and chromium-driver")


def wait_for_text(driver, text: str, timeout: float = 120) -> str:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if text in body and "Running..." not in body:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear; the page shows:\n{body[:2000]}")


def assert_no_error(body: str, page: str) -> None:
    found = [marker for marker in ERROR_MARKERS if marker in body]
    assert not found, f"{page} shows {found}:\n{body[:3000]}"


def test_every_page_renders_without_errors():
    with dashboard() as url, chromium() as driver:
        driver.get(url)
        body = wait_for_text(driver, "Full-precision perplexity")
        assert "SmolLM2-135M-Instruct" in body and "dequantized Q4_1" in body
        assert_no_error(body, "home")
        driver.save_screenshot(str(ARTIFACTS / "home.png"))

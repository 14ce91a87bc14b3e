"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium, for the dashboard test."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest


def _driver(width: int = 1500, height: int = 1500):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not browser or not driver_bin:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    return webdriver.Chrome(service=Service(driver_bin), options=options)


def _visible_texts(driver) -> list[str]:
    return [t.strip() for t in driver.find_element("tag name", "body").text.splitlines() if t.strip()]


def _open_tab(driver, label: str, timeout: float = 300) -> None:
    """Click the tab named `label`. The timeouts are long: on a loaded 2-core machine the UI can take over a
    minute to draw a run page."""
    deadline = time.monotonic() + timeout
    # Prefect 3's UI draws its tabs as <li class="p-tab"> (no button or tab role) whose label sits between
    # empty text nodes: match an element with any own text node equal to the label.
    xpath = f"//*[text()[normalize-space(.)='{label}']]"
    while True:
        tabs = [t for t in driver.find_elements("xpath", xpath) if t.is_displayed()]
        if tabs:
            tabs[-1].click()
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no '{label}' tab on {driver.current_url}: {_visible_texts(driver)[:40]}")
        time.sleep(1)


def _wait_for(driver, predicate, what: str, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        texts = _visible_texts(driver)
        if predicate(texts):
            return texts
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not shown on {driver.current_url}: {texts[:60]}")
        time.sleep(1)


def screenshot_flow_run(ui_url: str, flow_run_id: str, out: str | Path) -> dict[str, list[str]]:
    """Open a flow run's page in the Prefect UI: its task list and artifacts; save a screenshot of the page.

    Returns the visible text lines of the "graph" (task runs) view and of the artifacts tab.
    """
    driver = _driver()
    try:
        driver.get(f"{ui_url}/runs/flow-run/{flow_run_id}")
        _open_tab(driver, "Task Runs")
        # Task run names are the task's name and a 3-hex suffix ("pretrain-49b"); the flow is also "pretrain".
        graph = _wait_for(driver, lambda t: any(re.fullmatch(r"pretrain-[0-9a-f]{3}", line) for line in t),
                          "the task runs")
        _open_tab(driver, "Artifacts")
        artifacts = _wait_for(driver, lambda t: any("loss-curve" in line for line in t), "the artifacts")
        time.sleep(2)  # let the images and the run graph finish drawing
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        return {"graph": graph, "artifacts": artifacts}
    finally:
        driver.quit()

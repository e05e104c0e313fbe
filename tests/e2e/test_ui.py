"""The MLflow UI, in a real headless Chromium, over the store a real visiontune sweep wrote.

A tiny two-model sweep (the real CLI, real JPEGs) fills outputs/mlflow.db and outputs/mlartifacts;
`mlflow ui` serves that store on a free 127.0.0.1 port; Selenium drives Debian's Chromium through
the runs table, a child run's page, its val_acc chart and its val_acc.png artifact. Nothing leaves
127.0.0.1: the browser resolves no other host and uses no proxy, MLflow's telemetry is off.

Screenshots land in the test's tmp_path and are copied to outputs/ui-test/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import REPO, background_server, free_port
from visiontune.commands import TRAINING_VIEW

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO / "outputs" / "ui-test"
CHILDREN = ("squeezenet-scratch", "resnet-scratch")
WAIT_S = 45  # generous for a 2-core machine; every wait below is bounded by it

# The val_acc row of the run page's metrics table (name, value, models).
METRIC_ROW = "//*[@role='row'][*[@role='cell'][1][normalize-space()='val_acc']]"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1600,1000",
)


def _missing_browser() -> str:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return ", ".join(missing)


pytestmark = pytest.mark.skipif(
    bool(_missing_browser()),
    reason=f"browser test needs {_missing_browser()} "
    "(apt-get install chromium chromium-driver; pip install -e '.[test]')",
)


# --- the store: a real sweep -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tiny_sweep):
    """The shared sweep's store: a parent run and its two children."""
    assert tiny_sweep.parent.info.run_name.startswith("sweep-")
    assert sorted(tiny_sweep.children) == sorted(CHILDREN)
    return tiny_sweep


# --- the server: the real `mlflow ui` ----------------------------------------------------------


@pytest.fixture(scope="module")
def ui(sweep, tmp_path_factory):
    """The README's `visiontune-ui`, run in the sweep's launch dir; its URL and the link it prints."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log_path = tmp_path_factory.mktemp("mlflow-ui") / "visiontune-ui.log"
    command = [sys.executable, "-m", "visiontune.commands.ui", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with background_server(command, sweep.store.parent.parent, env, f"{url}/health", log_path):
        assert "Warning" not in log_path.read_text(), "the server's own deprecations are not shown"
        (link,) = [
            line.removeprefix("open ")
            for line in log_path.read_text().splitlines()
            if line.startswith("open ")
        ]
        yield SimpleNamespace(url=url, link=link)


def test_a_taken_port_is_refused_in_one_line(sweep):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "visiontune.commands.ui", "--port", str(port)],
            **{"cwd": sweep.store.parent.parent, "capture_output": True, "text": True, "timeout": 60},
        )
    assert result.returncode == 1
    assert result.stderr.strip() == f"visiontune-ui: error: port {port} on 127.0.0.1 is taken: pass --port N"
    assert "open http" not in result.stdout, "no link to whatever else listens there"


# --- the browser: Debian's Chromium, a fresh profile per test ----------------------------------


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, what: str, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(
        condition, message=f"{what} not shown within {WAIT_S} s at {driver.current_url}"
    )


def visible(driver, css: str, what: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return wait_for(driver, what, ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def run_link(run) -> str:
    """The runs table and the run page link a run by its id."""
    return f"a[href$='/runs/{run.info.run_id}']"


def click_when_free(driver, locator, what: str) -> None:
    """Click once no tip covers the element: MLflow's GenAI overview opens a modal "Detect Issues"
    tip that blocks the whole page until its "Got it" is clicked, as a user has to."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def clicked(d) -> bool:
        try:
            d.find_element(*locator).click()
            return True
        except (ElementClickInterceptedException, StaleElementReferenceException):
            for button in d.find_elements(By.XPATH, "//button[normalize-space()='Got it']"):
                with contextlib.suppress(Exception):
                    button.click()
            return False

    wait_for(driver, f"a clickable {what}", clicked)


def close_assistant(driver) -> None:
    """MLflow opens its assistant panel on first load; closing it leaves the runs table room."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(
        By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"
    ):
        with contextlib.suppress(Exception):
            button.click()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save a screenshot in tmp_path and copy it to outputs/ui-test/; returns the path to look at."""
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    with contextlib.suppress(OSError):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(path, SCREENSHOTS / path.name))
    return path


# --- the tests ---------------------------------------------------------------------------------


def test_printed_link_lands_on_runs_with_the_sweep_nested(sweep, ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    assert ui.link == f"{ui.url}/#/experiments/{sweep.experiment_id}/runs?{TRAINING_VIEW}"
    browser.get(ui.link)
    parent = visible(browser, run_link(sweep.parent), "the sweep's parent run")
    close_assistant(browser)
    shot = screenshot(browser, tmp_path, "01-runs-table")
    # The runs table, straight away: not the GenAI overview, no extra clicks.
    assert f"/experiments/{sweep.experiment_id}/runs" in browser.current_url, f"see {shot}"
    assert "/overview" not in browser.current_url, f"see {shot}"
    assert parent.text == sweep.parent.info.run_name, f"see {shot}"
    # Children sit under their parent, collapsed behind its expander.
    assert not browser.find_elements(By.CSS_SELECTOR, run_link(sweep.children["resnet-scratch"])), (
        f"see {shot}"
    )

    parent_row = parent.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
    row_index = int(parent_row.get_attribute("row-index"))
    parent_row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    children = {
        name: visible(browser, run_link(sweep.children[name]), f"child run {name}") for name in CHILDREN
    }
    shot = screenshot(browser, tmp_path, "02-runs-table-expanded")
    # Nested: the children's rows follow the parent's, their names indented past the parent's.
    parent = browser.find_element(By.CSS_SELECTOR, run_link(sweep.parent))
    child_rows = set()
    for name, child in children.items():
        assert child.text == name, f"see {shot}"
        assert child.location["x"] > parent.location["x"], (
            f"{name} is not indented under the parent; see {shot}"
        )
        child_rows.add(
            int(child.find_element(By.XPATH, "./ancestor::*[@role='row'][1]").get_attribute("row-index"))
        )
    assert child_rows == {row_index + 1, row_index + 2}, f"children not right under the parent; see {shot}"

    browser.find_element(By.CSS_SELECTOR, run_link(sweep.children["squeezenet-scratch"])).click()
    wait_for(
        browser,
        "the child's run page",
        lambda d: d.current_url.endswith(sweep.children["squeezenet-scratch"].info.run_id),
    )
    visible(browser, run_link(sweep.parent), "the child's link back to its parent run")
    screenshot(browser, tmp_path, "03-child-run-page")


def test_child_run_page_shows_val_acc_chart_and_plot(sweep, ui, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    run = sweep.children["squeezenet-scratch"]
    browser.get(f"{ui.url}/#/experiments/{sweep.experiment_id}/runs/{run.info.run_id}?{TRAINING_VIEW}")
    wait_for(
        browser, "the run's name", ec.text_to_be_present_in_element((By.TAG_NAME, "h2"), run.info.run_name)
    )
    close_assistant(browser)
    # Overview: the metrics table holds val_acc with the value the store holds.
    cell = wait_for(
        browser,
        "val_acc in the metrics table",
        ec.visibility_of_element_located((By.XPATH, f"{METRIC_ROW}/*[@role='cell'][2]")),
    )
    shot = screenshot(browser, tmp_path, "04-child-overview")
    assert float(cell.text) == run.data.metrics["val_acc"], f"see {shot}"

    # Model metrics: searching val_acc leaves its chart, drawn for this run.
    wait_for(
        browser,
        "the Model metrics tab",
        ec.element_to_be_clickable((By.XPATH, "//*[@role='tab'][normalize-space()='Model metrics']")),
    ).click()
    visible(browser, "input[placeholder='Search metric charts']", "the chart search box").send_keys("val_acc")
    legend = f"{run.info.run_name} (val_acc)"
    wait_for(
        browser,
        f"the val_acc chart's legend '{legend}'",
        ec.text_to_be_present_in_element((By.TAG_NAME, "body"), legend),
    )
    shot = screenshot(browser, tmp_path, "05-child-val_acc-chart")
    assert "/model-metrics" in browser.current_url, f"see {shot}"
    titles = {
        e.text
        for e in browser.find_elements(By.XPATH, "//*[normalize-space()='val_acc']")
        if e.is_displayed()
    }
    assert "val_acc" in titles, f"no visible val_acc chart title; see {shot}"
    assert "train_loss" not in browser.find_element(By.TAG_NAME, "body").text, (
        f"search did not filter charts; see {shot}"
    )

    # Artifacts: the server reads outputs/mlartifacts and the browser renders val_acc.png.
    browser.find_element(By.XPATH, "//*[@role='tab'][normalize-space()='Artifacts']").click()
    wait_for(
        browser,
        "val_acc.png in the artifact tree",
        ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='val_acc.png']")),
    ).click()
    wait_for(
        browser,
        "the rendered val_acc.png",
        lambda d: d.execute_script(
            "return [...document.images].some(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 100)"
        ),
    )
    screenshot(browser, tmp_path, "06-child-val_acc-png")


def test_model_training_switch_is_remembered(sweep, ui, browser, tmp_path):
    """What the README tells users: click Model training once, and the plain link opens the runs."""
    from selenium.webdriver.common.by import By

    plain = f"{ui.url}/#/experiments/{sweep.experiment_id}"
    browser.get(plain)
    visible(browser, "h2", "the experiment page's heading")
    screenshot(browser, tmp_path, "07-plain-link-fresh-browser")
    click_when_free(
        browser, (By.XPATH, "//*[@role='button'][normalize-space()='Model training']"), "Model training"
    )
    visible(browser, run_link(sweep.parent), "the runs table after the switch")

    browser.get("about:blank")  # a full page load of the plain link, not an in-app hop
    browser.get(plain)
    visible(browser, run_link(sweep.parent), "the runs table from the plain link")
    shot = screenshot(browser, tmp_path, "08-plain-link-after-switch")
    assert f"/experiments/{sweep.experiment_id}/runs" in browser.current_url, f"see {shot}"

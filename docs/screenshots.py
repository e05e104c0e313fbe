"""Re-make the documentation's pictures from a real run: python docs/screenshots.py

Trains a small sweep (random weights, a few epochs, a few images of the tutorial's ants and bees),
evaluates its best child, writes its leaderboard with visiontune-compare, serves the store with
visiontune-ui and photographs the MLflow UI with headless Chromium (selenium + chromedriver:
apt-get install chromium chromium-driver; pip install -e ".[test]"). The pictures land in
docs/images/, shrunk to a palette so that all of them stay a few hundred KB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1500,820",
)
SWEEP = [
    "-m",
    "model=squeezenet,resnet,alexnet",
    "mode=scratch",
    "optimizer=adamw",
    "epochs=6",
    "batch_size=16",
]
WAIT_S = 60
HIDE_PATH = """
for (const e of document.querySelectorAll('body *')) {
  if (e.children.length === 0 && e.textContent.trim().startsWith('Path:')) {
    e.parentElement.style.visibility = 'hidden';
  }
}
"""


def small_folder(source: Path, dest: Path, train: int, val: int) -> Path:
    """The first images of each class of a train/ and val/ folder, copied."""
    for split, count in (("train", train), ("val", val)):
        for class_dir in sorted((source / split).iterdir()):
            out = dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.glob("*.jpg"))[:count]:
                shutil.copy2(image, out / image.name)
    return dest


def command(cwd: Path, name: str, *args: str) -> str:
    """Run one of the project's console scripts; its stdout."""
    print(f"$ {name} {' '.join(args)}", flush=True)
    result = subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ui_server(cwd: Path, port: int):
    """visiontune-ui over the launch folder's store; the link it prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = cwd / "visiontune-ui.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(BIN / "visiontune-ui"), "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + WAIT_S
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            with contextlib.suppress(OSError):
                if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"visiontune-ui did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        (link,) = [s.removeprefix("open ") for s in log.read_text().splitlines() if s.startswith("open ")]
        yield link
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    return driver


def wait_css(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def dismiss_panels(driver) -> None:
    """MLflow's assistant panel and its tips, closed as a user would."""
    from selenium.webdriver.common.by import By

    for css in ("[data-component-id='mlflow.assistant.chat_panel.close']",):
        for button in driver.find_elements(By.CSS_SELECTOR, css):
            with contextlib.suppress(Exception):
                button.click()
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Got it']"):
        with contextlib.suppress(Exception):
            button.click()


def save(driver, name: str) -> None:
    time.sleep(2)  # charts and tables finish their animations
    path = IMAGES / name
    driver.save_screenshot(str(path))
    shrink(path)


def shrink(path: Path, width: int | None = None) -> None:
    """A 256-colour palette (and a narrower picture where asked): UI screenshots stay sharp."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB)", flush=True)


def photograph_ui(launch: Path, parent_id: str, child_id: str, experiment_id: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with ui_server(launch, free_port()) as link:
        driver = browser(launch / "profile")
        try:
            driver.get(link)
            parent = wait_css(driver, f"a[href$='/runs/{parent_id}']")
            dismiss_panels(driver)
            row = parent.find_element(By.XPATH, "./ancestor::*[@role='row'][1]")
            row.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
            wait_css(driver, f"a[href$='/runs/{child_id}']")
            save(driver, "mlflow-sweep.png")

            base = link.split("#")[0]
            view = link.split("?")[-1]  # the training view, not MLflow 3's GenAI one
            driver.get(f"{base}#/experiments/{experiment_id}/runs/{parent_id}/artifacts?{view}")
            dismiss_panels(driver)
            entry = "//*[normalize-space()='leaderboard.md']"
            WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.XPATH, entry))
            driver.find_elements(By.XPATH, entry)[-1].click()
            body = (By.TAG_NAME, "body")
            WebDriverWait(driver, WAIT_S).until(lambda d: "best_val_acc" in d.find_element(*body).text)
            # The artifact's location is a temporary folder of the machine that made the picture.
            driver.execute_script(HIDE_PATH)
            save(driver, "mlflow-leaderboard.png")
        finally:
            driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "hymenoptera_data",
        help="the tutorial's hymenoptera_data folder (train/ and val/)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the launch folder and print it")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data folder at {args.data}: pass --data DIR (the tutorial's hymenoptera_data)")
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: apt-get install chromium chromium-driver")

    IMAGES.mkdir(parents=True, exist_ok=True)
    launch = Path(tempfile.mkdtemp(prefix="visiontune-screenshots-"))
    data = small_folder(args.data, launch / "ants_bees", train=48, val=24)
    command(launch, "visiontune-train", *SWEEP, "data=imagefolder", f"data.root={data}", "num_workers=0")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{launch / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("visiontune")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    best = parent.data.tags["best_child_run_id"]

    reports = launch / "reports"
    command(launch, "visiontune-compare", "--parent", parent.info.run_id, "--out", str(reports / "sweep"))
    command(launch, "visiontune-evaluate", best, "--data", str(data), "--out", str(reports / "eval"))
    for source, name in (
        (reports / "sweep" / "val_acc_overlay.png", "val_acc_overlay.png"),
        (reports / "eval" / "confusion_matrix.png", "confusion_matrix.png"),
    ):
        shutil.copy2(source, IMAGES / name)
        shrink(IMAGES / name, width=900)

    photograph_ui(launch, parent.info.run_id, best, experiment.experiment_id)
    if args.keep:
        print(f"launch folder: {launch}")
    else:
        shutil.rmtree(launch, ignore_errors=True)


if __name__ == "__main__":
    main()

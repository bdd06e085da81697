"""Notebook 04 in a real browser: JupyterLab served headless, run in Chromium, and the 3D
viewer's canvas checked to be drawn (shaded mesh pixels on its white background).

Chromium is driven over the Chrome DevTools Protocol with websocket-client, which jupyter_server
already installs: no driver binary whose version must match Chromium's (selenium), no Node.js
(playwright), nothing downloaded. Runs with `make test-browser` (which installs Debian's
chromium when missing); skipped where /usr/bin/chromium is absent. Writes the screenshot to
outputs/browser/viewer.png.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "notebooks/04_mesh_extraction.ipynb"
SCREENSHOT = REPO / "outputs" / "browser" / "viewer.png"
# As this machine's Chromium needs them. No --use-gl=swiftshader: that turns WebGL off.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000", "--remote-debugging-port=0",
]  # fmt: skip
# JupyterLab user settings: no news or update checks (no network, no toasts over the page);
# no autosave; every cell attached to the DOM (the canvas exists wherever it is scrolled).
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True,
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}  # fmt: skip

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not installed: make test-browser installs it", allow_module_level=True)
websocket = pytest.importorskip("websocket", reason="websocket-client comes with jupyter_server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, period: float = 0.5):
    """Poll until `condition()` is truthy; -> its value. Fails naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(period)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class DevTools:
    """A minimal Chrome DevTools Protocol client for one page."""

    def __init__(self, websocket_url: str):
        # suppress_origin: Chromium refuses DevTools websockets that carry an Origin header.
        self.socket = websocket.create_connection(websocket_url, timeout=120, suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")


@pytest.fixture
def jupyter_lab(tmp_path):
    """JupyterLab on 127.0.0.1 with a random port and token, serving a copy of the notebooks
    (the committed ones must stay without outputs); kernels get SMOKE=1 unless SMOKE is set
    (SMOKE=0: the notebooks at full size, as a student runs them)."""
    port, token = free_port(), secrets.token_hex(16)
    root = tmp_path / "lab-root"
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    settings_dir = tmp_path / "lab-settings"
    for plugin, values in LAB_SETTINGS.items():
        path = settings_dir / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {
        "OMP_WAIT_POLICY": "PASSIVE",  # see scripts/run_notebooks.py
        **os.environ, "SMOKE": os.environ.get("SMOKE", "1"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={settings_dir}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        "--LabApp.extension_manager=readonly",  # no PyPI queries for extension updates
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        command.append("--allow-root")
    log = (tmp_path / "jupyterlab.log").open("w")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 90, "JupyterLab to answer")
        yield base, token
    finally:
        stop(process)
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile; -> a DevTools client for its page."""
    profile = tmp_path / "chromium-profile"
    command = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes its port here when listening
        wait_for(lambda: active.exists() and active.read_text().strip(), 60, "Chromium to start")
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            pages = [t for t in json.load(reply) if t["type"] == "page"]
        devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield devtools
        devtools.socket.close()
    finally:
        stop(process)


# The open notebook panel, its kernel and its code cells, as JupyterLab's own objects. (Not
# shell.currentWidget: that follows keyboard focus, which a headless window never has.)
NOTEBOOK_PANEL_JS = """(window.jupyterapp ?
  Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.context && w.sessionContext)
  : undefined)"""
NOTEBOOK_STATE_JS = f"""(() => {{
  const panel = {NOTEBOOK_PANEL_JS};
  if (!panel || !panel.content) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter(cell => cell.model.type === 'code');
  const errors = cells.flatMap(cell => cell.model.outputs.toJSON())
    .filter(output => output.output_type === 'error')
    .map(output => output.ename + ': ' + output.evalue);
  return JSON.stringify({{
    path: panel.context.path, kernel: kernel ? kernel.status : null, cells: cells.length,
    executed: cells.filter(cell => cell.model.executionCount !== null).length, errors}});
}})()"""
# Make the notebook the tracker's current one, then run all its cells (without waiting).
RUN_ALL_JS = f"""(() => {{
  window.jupyterapp.shell.activateById({NOTEBOOK_PANEL_JS}.id);
  void window.jupyterapp.commands.execute('notebook:run-all-cells');
}})()"""
# The first pythreejs canvas of any output, scrolled to the middle of the window.
CANVAS_JS = """(() => {
  const canvases = [...document.querySelectorAll('.jp-OutputArea-output canvas')]
    .filter(canvas => canvas.width > 64 && canvas.height > 64);
  if (!canvases.length) return null;
  canvases[0].scrollIntoView({block: 'center'});
  const box = canvases[0].getBoundingClientRect();
  return JSON.stringify({x: box.x, y: box.y, width: box.width, height: box.height,
                         count: canvases.length});
})()"""


def notebook_state(devtools: DevTools) -> dict | None:
    state = devtools.evaluate(NOTEBOOK_STATE_JS)
    return json.loads(state) if state else None


def drawn_fraction(pixels: np.ndarray) -> tuple[float, float, float]:
    """(share of white background, share of other pixels, std of the other pixels' brightness)."""
    white = (pixels >= 245).all(axis=-1)
    other = pixels[~white]
    spread = float(other.mean(axis=-1).std()) if len(other) else 0.0
    return float(white.mean()), float((~white).mean()), spread


def test_drawn_fraction_tells_a_blank_canvas_from_a_drawn_one():
    blank = np.full((64, 64, 3), 255, np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)  # what a canvas shows when WebGL failed
    drawn = blank.copy()
    drawn[16:48, 16:48] = np.linspace(60, 200, 32).astype(np.uint8)[:, None, None]  # shaded
    assert drawn_fraction(blank)[1] == 0.0
    assert drawn_fraction(black)[0] == 0.0 and drawn_fraction(black)[2] == 0.0
    white, other, spread = drawn_fraction(drawn)
    assert white > 0.5 and other == pytest.approx(0.25) and spread > 10


def run_all_in_the_browser(
    browser: DevTools, base: str, token: str, notebook: str, timeout: float = 1800
) -> dict:
    """Open `notebook` in JupyterLab, Run All, wait for the last cell. -> its state"""
    browser.call("Page.navigate", url=f"{base}/lab/tree/{notebook}?token={token}&reset")

    def kernel_idle():
        state = notebook_state(browser)
        return state if state and state["path"] == notebook and state["kernel"] == "idle" else None

    wait_for(kernel_idle, 180, f"{notebook} to open with an idle kernel")
    browser.evaluate(RUN_ALL_JS)

    def finished():
        state = notebook_state(browser)
        if state["errors"]:
            pytest.fail(f"{notebook} failed in the browser: {state['errors']}")
        done = state["executed"] == state["cells"] and state["kernel"] == "idle"
        return state if done else None

    return wait_for(finished, timeout, f"every cell of {notebook} to run", period=2)


def test_notebook_04_draws_the_3d_viewer_in_jupyterlab(jupyter_lab, browser):
    base, token = jupyter_lab
    state = run_all_in_the_browser(browser, base, token, NOTEBOOK, timeout=600)
    assert state["cells"] > 5

    box = json.loads(wait_for(lambda: browser.evaluate(CANVAS_JS), 60, "a pythreejs canvas"))
    time.sleep(3)  # let three.js draw the frame after scrolling
    box = json.loads(browser.evaluate(CANVAS_JS))
    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)

    page = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    x0, y0 = max(int(box["x"]), 0), max(int(box["y"]), 0)
    canvas = page[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"])]
    assert canvas.size, f"the canvas {box} is outside the screenshot {page.shape}"
    white, other, spread = drawn_fraction(canvas)
    # A drawn viewer: its white background around the mesh, and a shaded (not flat) mesh.
    assert white > 0.05, f"no white background in the canvas: blank or failed WebGL ({box})"
    assert other > 0.01, f"the canvas shows no mesh: {other:.2%} non-white pixels ({box})"
    assert spread > 5, f"the mesh pixels are one flat colour (std {spread:.1f}): no shading"


# The first code cell whose source holds `marker`, scrolled to the top of the window. -> its
# index among the notebook's cells
SCROLL_TO_CELL_JS = """((marker) => {{
  const panel = {panel};
  const cells = panel.content.widgets;
  const index = cells.findIndex(cell => cell.model.type === 'code'
    && cell.model.sharedModel.getSource().includes(marker));
  if (index < 0) return null;
  cells[index].node.scrollIntoView({{block: 'start'}});
  return index;
}})"""
# What a student looks for after Run All, notebook by notebook: the cells new in this round.
WALKTHROUGH = {
    "00_environment": ["show_environment_report"],
    "01_dataset": ["my_dataset"],
    "02_lora_injection": ["codes_merged"],
    "03_training": ["LivePlot(", "compare_lora_settings("],
    "04_mesh_extraction": ["prepare_photo"],
    "05_evaluation": ["paired_scatter", "lora_update_plot"],
}
WALKTHROUGH_SHOTS = REPO / "outputs" / "browser" / "walkthrough"


def test_the_six_notebooks_run_in_order_in_jupyterlab(jupyter_lab, browser):
    """A student's walk: each notebook opened in JupyterLab and run with Run All, in order;
    none may show an error. Screenshots of the cells new in this round go to
    outputs/browser/walkthrough/ (the page with that cell at its top)."""
    base, token = jupyter_lab
    WALKTHROUGH_SHOTS.mkdir(parents=True, exist_ok=True)
    for name, markers in WALKTHROUGH.items():
        state = run_all_in_the_browser(browser, base, token, f"notebooks/{name}.ipynb")
        assert state["cells"] > 3 and not state["errors"]
        for marker in markers:
            script = SCROLL_TO_CELL_JS.format(panel=NOTEBOOK_PANEL_JS)
            index = browser.evaluate(f"{script}({json.dumps(marker)})")
            assert index is not None, f"{name}: no cell holds {marker!r}"
            time.sleep(2)  # let the page settle (images decode, three.js draws)
            png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
            slug = "".join(c if c.isalnum() else "_" for c in marker).strip("_")
            (WALKTHROUGH_SHOTS / f"{name}-{slug}.png").write_bytes(png)

"""The six notebooks executed as `make demo` executes them (scripts/run_notebooks.py, here
with SMOKE=1), then read as a student reads them: no error, no check the prose says must
hold printing False, no progress bar frozen at 0 %, and the figures the review found wrong
now right. This is where `make test` runs the notebooks."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# A check prints "<claim>: True"; the claims each notebook's prose says must hold (a printed
# claim may say more, e.g. name the adapter it reloaded).
CHECK = re.compile(r"^(?P<claim>[^\n]+):\s+(?P<holds>True|False)$", re.MULTILINE)
EXPECTED_CHECKS = {
    "01_dataset": ["every depth point lies on the surface (< 0.001)", "cameras equal",
                   "depths equal"],
    "02_lora_injection": ["bit-identical", "only adapter weights changed",
                          "merged == adapted (to float32 rounding)"],
    "03_training": ["reloads to the same model"],
}  # fmt: skip
# tqdm's text: "label:  0%|          | 0/6 [00:00<?, ?object/s]"; n = 0 of a total: it never moved.
FROZEN_BAR = re.compile(r"(?<!\d)0%\|[^|\n]*\|\s*0/[1-9]")


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, nbformat.NotebookNode]:
    """{stem: executed notebook} from one SMOKE run of the runner (5 to 10 min on 2 cores), or
    read from the folder EXECUTED_NOTEBOOKS names (e.g. outputs/notebooks after
    `SMOKE=1 python scripts/run_notebooks.py`), to re-read a run without repeating it."""
    out = Path(os.environ.get("EXECUTED_NOTEBOOKS") or tmp_path_factory.mktemp("executed"))
    if "EXECUTED_NOTEBOOKS" not in os.environ:
        env = {**os.environ, "SMOKE": "1", "PYTHONPATH": str(REPO)}
        command = [sys.executable, str(REPO / "scripts" / "run_notebooks.py"), "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        print(done.stdout, done.stderr[-3000:])
    return {p.stem: nbformat.read(p, as_version=4) for p in sorted(out.glob("*.ipynb"))}


def texts(notebook) -> list[tuple[int, str]]:
    """(cell index, text) of every stream and text/plain output."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                found.append((index, output.text))
            elif "text/plain" in output.get("data", {}):
                found.append((index, output.data["text/plain"]))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ran_to_the_end_without_an_error(executed, path):
    assert path.stem in executed, f"{path.name} did not run: an earlier notebook failed"
    for index, cell in enumerate(executed[path.stem].cells):
        for output in cell.get("outputs", []):
            assert output.output_type != "error", (
                f"{path.name} cell {index}: {output.ename}: {output.evalue}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_check_holds_and_none_is_missing(executed, path):
    notebook = executed.get(path.stem)
    assert notebook is not None, f"{path.name} did not run"
    checks = [
        (i, m["claim"].strip(), m["holds"]) for i, t in texts(notebook) for m in CHECK.finditer(t)
    ]
    failed = [f"cell {i}: {claim}" for i, claim, holds in checks if holds == "False"]
    assert not failed, f"{path.name} printed False for a check its prose says must hold: {failed}"
    claims = {claim for _, claim, _ in checks}
    missing = [c for c in EXPECTED_CHECKS.get(path.stem, []) if not any(c in x for x in claims)]
    assert not missing, f"{path.name} no longer prints the checks {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_progress_bar_is_saved_frozen_at_zero(executed, path):
    notebook = executed.get(path.stem)
    assert notebook is not None, f"{path.name} did not run"
    frozen = [f"cell {i}: {t.strip()[:80]}" for i, t in texts(notebook) if FROZEN_BAR.search(t)]
    assert not frozen, f"{path.name} keeps progress bars that never moved: {frozen}"


def images_of(notebook, marker: str) -> list[np.ndarray]:
    """The PNG outputs of the code cell whose source holds `marker`, as RGB arrays."""
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and marker in c.source]
    pngs = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p))).convert("RGB")) for p in pngs]


def test_the_box_of_notebook_00_shows_each_side_in_its_own_colour(executed):
    """Its face colours were floats 0-255, which trimesh clipped to white: a grey box."""
    (strip,) = images_of(executed["00_environment"], "each side its own colour")
    pixels = strip.reshape(-1, 3).astype(int)
    drawn = pixels[(pixels < 245).any(axis=1)]
    saturation = drawn.max(axis=1) - drawn.min(axis=1)
    assert np.mean(saturation > 40) > 0.5, "the box is drawn grey"


def test_notebook_03_shows_its_final_loss_curve_once(executed):
    notebook = executed["03_training"]
    fit_cells = [c for c in notebook.cells if c.cell_type == "code" and "fit(" in c.source]
    for cell in fit_cells:  # the live plot, and the previews in the first run
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == (2 if "PreviewCallback" in cell.source else 1), cell.source

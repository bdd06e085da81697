"""`python -m tsr` on the embedded model, as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_images_to_meshes_and_renders(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "tsr", str(REPO / "examples" / "sphere.png"), "--pretrained",
         "tiny", "--output-dir", str(out), "--mc-resolution", "24", "--threshold", "0.4",
         "--format", "ply", "--no-remove-bg"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "sphere" / "input.png").is_file() and (out / "sphere" / "mesh.ply").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"][0]["faces"] >= 0 and run["settings"]["mc_resolution"] == 24


def test_missing_image_is_named(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tsr", str(tmp_path / "nope.png")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "nope.png" in done.stderr

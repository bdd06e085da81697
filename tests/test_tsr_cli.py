"""`python -m tsr` on the embedded model: as a subprocess, and through main(argv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tsr.__main__ import main
from tsr.export import output_names, write_atomic

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


def test_inputs_with_one_stem_get_their_own_folders(tmp_path):
    images = []
    for folder, suffix in (("a", "png"), ("b", "PNG")):
        (tmp_path / folder).mkdir()
        images.append(tmp_path / folder / f"sphere.{suffix}")
        shutil.copy(REPO / "examples" / "sphere.png", images[-1])
    out = tmp_path / "out"
    main([*map(str, images), "--pretrained", "tiny", "--output-dir", str(out),
          "--mc-resolution", "16", "--threshold", "0.4", "--no-remove-bg"])  # fmt: skip
    meshes = [Path(row["mesh"]) for row in json.loads((out / "run.json").read_text())["outputs"]]
    assert len({m.parent for m in meshes}) == 2 and all(m.is_file() for m in meshes)
    # Deterministic: the same names in any order, and for the same file given twice.
    assert output_names(images) == output_names(images[::-1])[::-1]
    assert output_names([images[0], images[0]]) == ["sphere", "sphere"]
    assert output_names([images[0], tmp_path / "c" / "other.png"]) == ["sphere", "other"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = write_atomic(tmp_path / "mesh.obj", b"old")

    def no_rename(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["mesh.obj"]

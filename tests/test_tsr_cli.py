"""`python -m tsr` on the embedded model: as a subprocess, and through main(argv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trimesh
from PIL import Image

from tsr.__main__ import main, parse_args
from tsr.export import output_names
from tsr.files import write_bytes

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
    saved = trimesh.load(out / "sphere" / "mesh.ply", force="mesh")  # the file is the oracle
    assert run["outputs"][0]["faces"] == len(saved.faces) and run["settings"]["mc_resolution"] == 24


def test_missing_image_is_named(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tsr", str(tmp_path / "nope.png")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "nope.png" in done.stderr


# TripoSR's run.py flags, each with a value other than our default, and where it lands.
OFFICIAL_FLAGS = {
    "--pretrained-model-name-or-path": ("tiny", "pretrained", "tiny"),
    "--model-save-format": ("glb", "format", "glb"),
    "--chunk-size": ("0", "chunk_size", 0),
    "--mc-resolution": ("32", "mc_resolution", 32),
    "--no-remove-bg": (None, "no_remove_bg", True),
    "--foreground-ratio": ("0.9", "foreground_ratio", 0.9),
    "--render": (None, "render", True),
    "--output-dir": ("somewhere", "output_dir", Path("somewhere")),
    "--device": ("cpu", "device", "cpu"),
    "--bake-texture": (None, "bake_texture", True),
    "--texture-resolution": ("64", "texture_resolution", 64),
}


@pytest.mark.parametrize("flag", OFFICIAL_FLAGS)
def test_official_flag_parses(flag):
    value, destination, expected = OFFICIAL_FLAGS[flag]
    args = parse_args(["chair.png", flag] + ([] if value is None else [value]))
    assert getattr(args, destination) == expected


def test_official_readme_command_parses():
    args = parse_args(["examples/chair.png", "--output-dir", "output/"])
    assert args.images == [Path("examples/chair.png")] and args.output_dir == Path("output")


def test_a_texture_needs_a_format_that_holds_one(capsys):
    with pytest.raises(SystemExit):
        parse_args(["chair.png", "--bake-texture", "--format", "ply"])
    assert "obj or glb" in capsys.readouterr().err


def test_run_py_command_bakes_a_texture(tmp_path):
    """A run.py command line, every official flag spelt as run.py spells it, on the tiny model."""
    out = tmp_path / "output"
    done = subprocess.run(
        [sys.executable, "-m", "tsr", str(REPO / "examples" / "sphere.png"),
         "--pretrained-model-name-or-path", "tiny", "--output-dir", str(out), "--device", "cpu",
         "--chunk-size", "0", "--mc-resolution", "24", "--no-remove-bg", "--foreground-ratio",
         "0.85", "--model-save-format", "obj", "--bake-texture", "--texture-resolution", "64",
         "--threshold", "0.4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(p.name for p in (out / "sphere").iterdir())
    assert files == ["input.png", "mesh.mtl", "mesh.obj", "mesh.png"]
    assert Image.open(out / "sphere" / "mesh.png").size == (64, 64)
    assert json.loads((out / "run.json").read_text())["outputs"][0]["texture"] == 64


def test_cuda_without_cuda_falls_back_to_the_cpu_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main([str(REPO / "examples" / "sphere.png"), "--pretrained", "tiny", "--device", "cuda:0",
          "--output-dir", str(tmp_path), "--mc-resolution", "16", "--threshold", "0.4",
          "--no-remove-bg"])  # fmt: skip
    notices = [line for line in capsys.readouterr().err.splitlines() if "CUDA" in line]
    assert notices == ["--device cuda:0: CUDA is not available, running on the CPU"]
    assert json.loads((tmp_path / "run.json").read_text())["settings"]["device"] == "cpu"


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
    target = write_bytes(tmp_path / "mesh.obj", b"old")

    def no_rename(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["mesh.obj"]

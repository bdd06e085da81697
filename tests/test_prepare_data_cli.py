"""prepare_data.py as a user runs it: a subprocess, on tiny settings."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from tsr import errors
from tsr.errors import UserInputError
from utils.data.build import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
# the CLI is a script at the repo root, not a package module: load it from its file
_spec = importlib.util.spec_from_file_location("prepare_data", REPO / "prepare_data.py")
prepare_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_data)
TINY = ["--views", "3", "--size", "32"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "prepare_data.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def object_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_in_parallel_then_skip_then_force(tmp_path):
    out = tmp_path / "set"
    result = run_cli("--out", str(out), "--n", "3", "--workers", "2", *TINY)
    assert result.returncode == 0, result.stderr
    assert "3 built" in result.stdout and "views/s" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json", "parts_000", "primitives_000", "primitives_001", "split.json",
    ]  # fmt: skip
    assert len(list((out / "parts_000" / "rgba").glob("*.png"))) == 3
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == [
        "parts_000",
        "primitives_000",
        "primitives_001",
    ]

    # the worker processes wrote the same bytes a single process writes
    serial = tmp_path / "serial"
    prepare_dataset(serial, n_objects=3, n_views=3, size=32, workers=1)
    assert object_files(out) == object_files(serial)

    # a rerun keeps finished objects; --force rebuilds; other settings need --force
    stamp = (out / "parts_000" / "meta.json").stat().st_mtime_ns
    assert prepare_data.main(["--out", str(out), "--n", "3", *TINY]) == 0
    assert (out / "parts_000" / "meta.json").stat().st_mtime_ns == stamp
    assert (
        prepare_data.main(["--out", str(out), "--n", "3", "--force", "--workers", "1", *TINY]) == 0
    )
    assert (out / "parts_000" / "meta.json").stat().st_mtime_ns != stamp
    with pytest.raises(UserInputError, match="--force"):
        prepare_data.main(["--out", str(out), "--n", "3", "--views", "4", "--size", "32"])
    assert not list(out.glob(".*"))  # no temporary folders left behind


def test_bad_files_are_named_and_skipped(tmp_path):
    meshes = tmp_path / "meshes"
    (meshes / "sub").mkdir(parents=True)
    trimesh.creation.box().export(meshes / "sub" / "good_box.obj")
    trimesh.creation.icosphere(2).export(meshes / "ball.stl")
    (meshes / "empty.obj").write_text("")
    (meshes / "broken.glb").write_bytes(b"\x00garbage")
    trimesh.PointCloud(np.random.default_rng(0).random((10, 3))).export(meshes / "cloud.ply")
    (meshes / "notes.txt").write_text("ignored: not a mesh suffix")
    out = tmp_path / "set"
    result = run_cli("--out", str(out), "--input-folder", str(meshes), "--workers", "1", *TINY)
    assert result.returncode == 0, result.stderr
    assert "2 built" in result.stdout and "3 skipped" in result.stdout
    for name in ("empty.obj", "broken.glb", "cloud.ply"):
        assert f"skipped {name}" in result.stdout
    assert (out / "sub_good_box" / "mesh.glb").exists() and (out / "ball" / "mesh.glb").exists()
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["objects"] == ["ball", "sub_good_box"] and len(dataset["skipped"]) == 3


@pytest.mark.parametrize("make_folder", [True, False])
def test_an_empty_or_missing_input_folder_is_a_clear_error(tmp_path, make_folder):
    folder = tmp_path / "nothing"
    if make_folder:
        folder.mkdir()
    code = errors.run_cli(
        prepare_data.main, ["--out", str(tmp_path / "set"), "--input-folder", str(folder)]
    )
    assert code == 2
    with pytest.raises(UserInputError, match="nothing"):
        prepare_dataset(tmp_path / "set", input_folder=folder)

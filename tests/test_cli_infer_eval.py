"""inference_lora.py and evaluate.py as subprocesses on the default (classroom) model and a tiny dataset."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trimesh
from PIL import Image

from tsr.errors import run_cli
from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.evaluation.threshold import choose_threshold
from utils.training.adapters import export_course_adapter, save_adapter
from utils.training.lora import add_lora

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 2-object dataset, an adapter (folder and course .pth) and a threshold the adapted
    model surely reaches (`choose_threshold` on this object)."""
    tmp = tmp_path_factory.mktemp("cli")
    prepare_dataset(
        tmp / "data", families=("primitives",), n_objects=2, n_views=3, size=32, workers=1
    )
    dataset = MultiViewDataset(tmp / "data", "all", cond_size=64)
    model = add_lora(TSR.from_pretrained(DEFAULT_MODEL), r=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # as after training: a zero B would make the adapter invisible
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    adapter = save_adapter(model, tmp / "adapter")
    course = export_course_adapter(model, tmp / "lora_weights.pth")
    level = choose_threshold(model, model.encode(dataset[0]["cond_image"][None]))
    images = tmp / "images"
    images.mkdir()
    for object_id in dataset.object_ids:
        Image.open(tmp / "data" / object_id / "rgba" / "000.png").save(images / f"{object_id}.png")
    return {
        "tmp": tmp, "data": tmp / "data", "adapter": adapter, "course": course, "images": images,
        "threshold": level, "ids": dataset.object_ids,
    }  # fmt: skip


@pytest.fixture(scope="module")
def batch(setup) -> Path:
    """Batch meshes of the dataset's view-0 images with the base and with the adapter folder."""
    out = setup["tmp"] / "batch"
    common = [
        "--image_dir",
        setup["images"],
        "--mc-resolution",
        24,
        "--threshold",
        setup["threshold"],
    ]
    base = run("inference_lora.py", *common, "--output_dir", out / "base")
    lora = run(
        "inference_lora.py", *common, "--output_dir", out / "lora", "--lora_path", setup["adapter"]
    )
    assert base.returncode == 0 and lora.returncode == 0, base.stderr + lora.stderr
    return out


def test_inference_batch_base_and_adapter_differ(setup, batch):
    for object_id in setup["ids"]:
        meshes = [
            trimesh.load(batch / m / f"{object_id}.obj", force="mesh") for m in ("base", "lora")
        ]
        assert all(len(m.faces) for m in meshes)
        assert meshes[0].vertices.shape != meshes[1].vertices.shape or (
            abs(meshes[0].vertices - meshes[1].vertices).max() > 1e-3
        )
    record = json.loads((batch / "lora" / "inference.json").read_text())
    assert record["adapter"] == str(setup["adapter"]) and len(record["outputs"]) == 2


def test_inference_single_image_with_the_course_pth_matches_the_adapter_folder(setup, batch):
    tmp, object_id = setup["tmp"], setup["ids"][0]
    result = run(
        "inference_lora.py", "--image_path", setup["images"] / f"{object_id}.png",
        "--lora_path", setup["course"], "--mc-resolution", 24, "--threshold", setup["threshold"],
        "--format", "ply", cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = tmp / "outputs" / "inference"  # the default: under outputs/, not the working folder
    assert (written / "mesh_lora.ply").is_file() and (written / "mesh_lora.json").is_file()
    # the course .pth (alpha folded into B) and our folder are the same adapter
    from_course = trimesh.load(written / "mesh_lora.ply", force="mesh")
    from_folder = trimesh.load(batch / "lora" / f"{object_id}.obj", force="mesh")
    assert from_course.vertices.shape == from_folder.vertices.shape
    assert abs(from_course.vertices - from_folder.vertices).max() < 1e-4


def test_evaluate_base_adapter_and_sphere(setup):
    out = setup["tmp"] / "eval"
    result = run(
        "evaluate.py", "--data", setup["data"], "--split", "all", "--adapter", setup["adapter"],
        "--output-dir", out, "--mc-resolution", 24, "--threshold", setup["threshold"],
        "--n-points", 1000,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "metrics.json").read_text())
    assert list(document["models"]) == ["sphere", "base", "lora"]
    assert set(document["paired"]) == {"sphere - base", "lora - base"}
    assert document["paired"]["lora - base"]["chamfer_l1"]["n"] == 2
    assert document["settings"]["threshold_used"] == pytest.approx(setup["threshold"])
    assert "## Paired per-object difference: lora - base" in (out / "metrics.md").read_text()
    assert (out / "metrics.png").stat().st_size > 0
    for model in ("base", "lora"):
        assert sorted(p.stem for p in (out / "meshes" / model).glob("*.glb")) == setup["ids"]


def test_clis_fail_with_messages_naming_the_problem(setup, capsys):
    # In-process (the scripts' main), since starting Python costs seconds on a 2-core CPU.
    evaluate_main = runpy.run_path(str(ROOT / "evaluate.py"))["main"]
    assert run_cli(evaluate_main, ["--data", str(setup["tmp"] / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    wrong = setup["tmp"] / "wrong.pth"
    torch.save({"transformer_blocks.0.attn1.to_q.A.weight": torch.zeros(16, 1024),
                "transformer_blocks.0.attn1.to_q.B.weight": torch.zeros(1024, 16)}, wrong)  # fmt: skip
    inference_main = runpy.run_path(str(ROOT / "inference_lora.py"))["main"]
    image = setup["images"] / f"{setup['ids'][0]}.png"
    assert inference_main(["--image_path", str(image), "--lora_path", str(wrong)]) == 2
    error = capsys.readouterr().err
    assert "wrong.pth" in error and "another size" in error

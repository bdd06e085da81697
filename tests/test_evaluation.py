"""Evaluation records, paired comparison and the report, on tiny prepared datasets."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import trimesh
from torch import nn

from tsr.cameras import CAMERA_DISTANCE, FOVY_DEG, pixel_to_ray
from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.evaluation import threshold
from utils.evaluation.evaluate import evaluate_model, render_view, sphere_records
from utils.evaluation.report import compare, write_report


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> MultiViewDataset:
    root = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset(root, families=("primitives",), n_objects=2, n_views=3, size=32, workers=1)
    return MultiViewDataset(root, "all", cond_size=64)


@pytest.fixture(scope="module")
def ball_dataset(tmp_path_factory) -> MultiViewDataset:
    folder = tmp_path_factory.mktemp("meshes")
    trimesh.creation.icosphere(subdivisions=4).export(folder / "ball.obj")
    root = tmp_path_factory.mktemp("data") / "ball"
    prepare_dataset(root, input_folder=folder, n_views=4, size=32, workers=1)
    return MultiViewDataset(root, "all", cond_size=64)


def low_threshold(model: TSR, dataset: MultiViewDataset) -> float:
    """The random tiny model never reaches TripoSR's 25: a level its field crosses."""
    return threshold.choose_threshold(model, model.encode(dataset[0]["cond_image"][None]))


def test_sphere_baseline_agrees_with_the_dataset_cameras(ball_dataset):
    (record,) = sphere_records(ball_dataset, n_points=2000)
    # prepare_data scales the ball so view 0's silhouette spans 0.85 of the frame: a sphere of
    # radius R at distance D fills it when tan(asin(R / D)) = 0.85 tan(fovy / 2)
    radius = CAMERA_DISTANCE * math.sin(math.atan(0.85 * math.tan(math.radians(FOVY_DEG / 2))))
    assert abs(record["radius"] - radius) <= 0.005  # the radius grid's step
    assert record["f@0.05"] > 0.99
    # the analytic sphere render overlaps the dataset's masks: cameras and pixels agree
    assert record["mask_iou"] > 0.9
    assert record["colour_error"] < 0.05  # the ball's own mean colour


def test_evaluate_model_records_meshes_and_scores(shapes_dataset, tmp_path):
    model = TSR.from_pretrained("tiny")
    threshold = low_threshold(model, shapes_dataset)
    records = evaluate_model(
        model, shapes_dataset, mc_resolution=24, threshold=threshold, n_points=1000,
        mesh_dir=tmp_path / "meshes",
    )  # fmt: skip
    assert [r["object_id"] for r in records] == shapes_dataset.object_ids
    for record in records:
        assert record["n_novel_views"] == 2 and not record["empty"]
        assert 0 <= record["f@0.05"] <= record["f@0.1"] <= 1
        assert record["chamfer_l1"] > 0 and math.isfinite(record["psnr"])
        assert 0 <= record["mask_iou"] <= 1 and 0 <= record["colour_error"] <= 2
        saved = trimesh.load(record["mesh"], force="mesh")
        assert len(saved.faces) == record["n_faces"] > 0


def test_render_view_puts_each_pixel_ray_in_its_place(shapes_dataset, monkeypatch):
    monkeypatch.setattr(TSR.render_cameras, "__defaults__", (100,))  # chunks, not a multiple of W
    model = TSR.from_pretrained("tiny")
    item = shapes_dataset[0]
    code = model.encode(item["cond_image"][None])[0]
    image = render_view(model, code, item, 1)
    assert image["rgb"].shape == (32, 32, 3) and image["opacity"].shape == (32, 32, 1)
    pixels = torch.tensor([[3, 7], [20, 11], [31, 0]])  # (row, column)
    rays_o, rays_d = pixel_to_ray(item["c2w"][1], pixels, 32, 32, item["fovy_deg"])
    with torch.no_grad():
        expected = model.render_rays(code, rays_o, rays_d)["rgb"]
    torch.testing.assert_close(image["rgb"][pixels[:, 0], pixels[:, 1]], expected)


def test_an_empty_mesh_is_recorded_and_reported(shapes_dataset, tmp_path):
    model = TSR.from_pretrained("tiny")
    with pytest.warns(UserWarning, match="empty mesh"):
        records = evaluate_model(
            model, shapes_dataset, mc_resolution=16, threshold=1e9, n_points=500
        )
    assert all(r["empty"] and math.isnan(r["chamfer_l1"]) and r["f@0.1"] == 0 for r in records)
    summary = compare({"base": records})
    assert summary["models"]["base"]["chamfer_l1"]["n"] == 0
    assert summary["models"]["base"]["empty_meshes"] == len(records)
    paths = write_report(summary, tmp_path)
    assert "| base | – |" in paths["markdown"].read_text()


def synthetic(values: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"object_id": f"o{i}", **{k: v[i] for k, v in values.items()}} for i in range(n)]


def test_compare_pairs_by_object_and_judges_against_two_standard_errors(tmp_path):
    base = synthetic({"chamfer_l1": [0.10, 0.20, 0.30, 0.40], "psnr": [10.0, 12.0, 14.0, 16.0]})
    # the adapter: Chamfer lower by 0.02 +- small on every object, PSNR changes by noise
    lora = synthetic({"chamfer_l1": [0.08, 0.17, 0.28, 0.38], "psnr": [10.5, 11.5, 14.5, 15.5]})
    summary = compare({"base": base, "lora": lora[::-1]})  # order does not matter, ids do
    paired = summary["paired"]["lora - base"]
    assert paired["chamfer_l1"]["mean"] == pytest.approx(-0.0225)
    assert paired["chamfer_l1"]["n"] == 4
    assert paired["psnr"]["mean"] == pytest.approx(0.0)
    assert summary["models"]["base"]["psnr"]["mean"] == pytest.approx(13.0)
    paths = write_report(summary, tmp_path, settings={"split": "test"})
    text = paths["markdown"].read_text()
    assert "| Chamfer-L1 | -0.0225 ± 0.0025 | 4 | better |" in text
    assert "| novel-view PSNR (dB) | +0.0000 ± 0.2887 | 4 | within noise |" in text
    document = json.loads(paths["json"].read_text())
    assert document["settings"] == {"split": "test"} and len(document["objects"]["lora"]) == 4
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="different objects"):
        compare({"base": base, "lora": lora[:3]})
    with pytest.raises(ValueError, match="no records for the base"):
        compare({"lora": lora})


class RadialField:
    """density_act = 10 (1 - |p|): the level L is crossed on the sphere of radius 1 - L/10."""

    def query_triplane(self, decoder, points: torch.Tensor, code) -> dict[str, torch.Tensor]:
        return {"density_act": 10 * (1 - points.norm(dim=-1, keepdim=True))}


class RadialModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # the device is read from the parameters
        self.config = SimpleNamespace(mc_threshold=4.0, renderer=SimpleNamespace(radius=0.87))
        self.renderer, self.decoder = RadialField(), None

    def encode(self, cond_image: torch.Tensor) -> torch.Tensor:
        return torch.zeros(cond_image.shape[0], 3, 1, 2, 2)


class BallOnDisk:
    """One object: a ball of radius 0.5 as its ground-truth mesh."""

    def __init__(self, root):
        self.root, self.object_ids = root, ["ball"]
        (root / "ball").mkdir(parents=True)
        trimesh.creation.icosphere(subdivisions=4, radius=0.5).export(root / "ball" / "mesh.glb")

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return {"object_id": "ball", "cond_image": torch.zeros(8, 8, 3)}


def test_best_threshold_is_the_level_whose_surface_is_the_true_one(tmp_path):
    """Levels 2, 4, 5, 6, 8 of the radial field are spheres of radius 0.8, 0.6, 0.5, 0.4,
    0.2; the truth is the 0.5 ball, so level 5 wins (not the model's own 4) and each level's
    Chamfer-L1 is about its sphere's distance from the ball, |r - 0.5|."""
    best, scores = threshold.best_threshold_by_chamfer(
        RadialModel(), BallOnDisk(tmp_path), factors=(0.5, 1.0, 1.25, 1.5, 2.0), resolution=24,
        n_points=2000,
    )  # fmt: skip
    assert best == pytest.approx(5.0)
    for level, radius in {2: 0.8, 4: 0.6, 6: 0.4, 8: 0.2}.items():
        assert scores[f"{level:g}"]["chamfer_l1"] == pytest.approx(abs(radius - 0.5), abs=0.01)
    # the same surface: only the spacing of 2,000 samples on each (~0.04) keeps it above 0
    assert scores["5"]["chamfer_l1"] < 0.03 and scores["5"]["f@0.05"] > 0.99

"""Evaluation records, paired comparison and the report, on tiny prepared datasets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trimesh
from torch import nn

from tsr.cameras import CAMERA_DISTANCE, FOVY_DEG
from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.evaluation import evaluate, threshold
from utils.evaluation.evaluate import (
    evaluate_model,
    evaluate_models,
    pixel_grid,
    render_pixels,
    sphere_records,
)
from utils.evaluation.metrics import sample_surface
from utils.evaluation.paper_protocol import paper_metrics
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
        model, shapes_dataset, name="tiny", mc_resolution=24, threshold=threshold, n_points=1000,
        mesh_dir=tmp_path / "meshes",
    )  # fmt: skip
    assert [r["object_id"] for r in records] == shapes_dataset.object_ids
    for record in records:
        assert record["n_novel_views"] == 2 and not record["empty"]
        assert 0 <= record["f@0.05"] <= record["f@0.1"] <= 1
        assert record["chamfer_l1"] > 0 and math.isfinite(record["psnr"])
        assert 0 <= record["mask_iou"] <= 1 and 0 <= record["colour_error"] <= 2
        assert record["mesh"] == str(tmp_path / "meshes" / "tiny" / f"{record['object_id']}.glb")
        saved = trimesh.load(record["mesh"], force="mesh")
        assert len(saved.faces) == record["n_faces"] > 0
        assert saved.visual.kind == "vertex"  # the decoder's colours travel with the mesh


def test_pixel_grid_is_every_stride_th_pixel_centred_in_its_cell():
    assert pixel_grid(4, 6, 2).tolist() == [
        [1, 1], [1, 3], [1, 5], [3, 1], [3, 3], [3, 5]
    ]  # fmt: skip
    assert pixel_grid(2, 3, 1).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_render_pixels_puts_each_pixel_ray_in_its_place(shapes_dataset, monkeypatch):
    monkeypatch.setattr(evaluate, "RAY_CHUNK", 100)  # chunks that cut views and rows anywhere
    model = TSR.from_pretrained("tiny")
    item = shapes_dataset[0]
    code = model.encode(item["cond_image"][None])[0]
    with torch.no_grad():  # the oracle: whole images, rays from rays_from_c2w, not pixel_to_ray
        images = model.render_cameras(code, item["c2w"][[1, 2]], item["fovy_deg"], 32, 32)
    every = render_pixels(model, code, item, [1, 2], pixel_grid(32, 32, 1))
    assert every["rgb"].shape == (2, 32 * 32, 3) and every["opacity"].shape == (2, 32 * 32, 1)
    torch.testing.assert_close(every["rgb"], images["rgb"].reshape(2, -1, 3))
    torch.testing.assert_close(every["opacity"], images["opacity"].reshape(2, -1, 1))
    quarter = render_pixels(model, code, item, [1, 2], pixel_grid(32, 32, 2))
    torch.testing.assert_close(quarter["rgb"], images["rgb"][:, 1::2, 1::2].reshape(2, -1, 3))


def test_one_pass_reads_each_object_once_and_scores_as_separate_runs(
    shapes_dataset, tmp_path, monkeypatch
):
    model, other = TSR.from_pretrained("tiny"), TSR.from_pretrained("tiny")
    with torch.no_grad():  # a second model, as an adapter would make it: other scene codes
        for parameter in other.backbone.parameters():
            parameter.mul_(1.05)
    settings = dict(mc_resolution=20, threshold=low_threshold(model, shapes_dataset), n_points=500)
    # the oracle: each model, and the sphere, evaluated on its own
    alone = {
        "sphere": sphere_records(shapes_dataset, 500),
        "a": evaluate_model(model, shapes_dataset, **settings),
        "b": evaluate_model(other, shapes_dataset, **settings),
    }
    reads = {"items": 0, "meshes": 0}
    read_item, read_mesh = MultiViewDataset.__getitem__, evaluate.load_mesh

    def counted_item(dataset, index):
        reads["items"] += 1
        return read_item(dataset, index)

    def counted_mesh(path):
        reads["meshes"] += 1
        return read_mesh(path)

    monkeypatch.setattr(MultiViewDataset, "__getitem__", counted_item)
    monkeypatch.setattr(evaluate, "load_mesh", counted_mesh)
    together = evaluate_models({"a": model, "b": other}, shapes_dataset, **settings)
    assert reads == {"items": len(shapes_dataset), "meshes": len(shapes_dataset)}
    assert list(together) == ["sphere", "a", "b"]
    for name, records in alone.items():
        for one, shared in zip(records, together[name], strict=True):
            assert {k: v for k, v in one.items() if k != "seconds"} == pytest.approx(
                {k: v for k, v in shared.items() if k != "seconds"}, nan_ok=True
            )
    with pytest.raises(ValueError, match="names the baseline"):
        evaluate_models({"sphere": model}, shapes_dataset, **settings)


def test_the_papers_columns_in_the_pass_equal_scoring_the_saved_meshes_afterwards(
    shapes_dataset, tmp_path
):
    model = TSR.from_pretrained("tiny")
    settings = dict(mc_resolution=20, threshold=low_threshold(model, shapes_dataset), n_points=800)
    without = evaluate_models({"a": model}, shapes_dataset, **settings)
    records = evaluate_models(
        {"a": model}, shapes_dataset, mesh_dir=tmp_path, paper_protocol=True, **settings
    )
    # the oracle: what notebook 05 did before, each saved mesh read back and sampled again
    for index, (sphere, record) in enumerate(zip(records["sphere"], records["a"], strict=True)):
        truth_mesh = evaluate.ground_truth_mesh(shapes_dataset, record["object_id"])
        truth = sample_surface(truth_mesh, 800)
        saved = sample_surface(trimesh.load(record["mesh"], force="mesh"), 800)
        ball = trimesh.creation.icosphere(subdivisions=4, radius=sphere["radius"])
        for scored, oracle in ((record, saved), (sphere, sample_surface(ball, 800))):
            expected = paper_metrics(oracle, truth)
            assert {k: scored[k] for k in expected} == pytest.approx(expected, rel=1e-6)
        # and the rest of the record is what it is without the papers' columns
        ignored = {*expected, "seconds", "mesh"}
        assert {k: v for k, v in record.items() if k not in ignored} == (
            {k: v for k, v in without["a"][index].items() if k not in ignored}
        )
    assert len({r["paper_chamfer"] for r in records["a"]}) == len(shapes_dataset)


def test_an_empty_mesh_is_recorded_and_reported(shapes_dataset, tmp_path):
    model = TSR.from_pretrained("tiny")
    with pytest.warns(UserWarning, match="empty mesh"):
        records = evaluate_model(
            model, shapes_dataset, mc_resolution=16, threshold=1e9, n_points=500,
            paper_protocol=True,
        )  # fmt: skip
    assert all(r["empty"] and math.isnan(r["chamfer_l1"]) and r["f@0.1"] == 0 for r in records)
    assert all(math.isnan(r["paper_chamfer"]) and r["paper_f@0.5"] == 0 for r in records)
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


def _scores(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "mesh")}


def test_objects_scored_in_parallel_give_the_records_of_one_at_a_time(
    shapes_dataset, tmp_path, monkeypatch
):
    """Worker threads score objects at once: the same records, in the dataset's order, each
    with its own mesh file, and no autograd graph in any worker (grad mode is per thread)."""
    model = TSR.from_pretrained("tiny")
    settings = dict(mc_resolution=20, threshold=low_threshold(model, shapes_dataset), n_points=500)
    monkeypatch.setattr(evaluate, "EVAL_WORKERS", 1)
    one_at_a_time = evaluate_models(
        {"a": model}, shapes_dataset, mesh_dir=tmp_path / "1", **settings
    )
    encode, graphs = model.encode, []

    def recording_encode(images):
        codes = encode(images)
        graphs.append(codes.requires_grad)
        return codes

    monkeypatch.setattr(model, "encode", recording_encode)
    monkeypatch.setattr(evaluate, "EVAL_WORKERS", 2)
    parallel = evaluate_models({"a": model}, shapes_dataset, mesh_dir=tmp_path / "2", **settings)
    assert graphs == [False] * len(shapes_dataset)
    for name, records in one_at_a_time.items():
        assert [r["object_id"] for r in parallel[name]] == [r["object_id"] for r in records]
        for one, shared in zip(records, parallel[name], strict=True):
            assert _scores(one) == _scores(shared)
            if "mesh" in one:
                assert Path(one["mesh"]).read_bytes() == Path(shared["mesh"]).read_bytes()

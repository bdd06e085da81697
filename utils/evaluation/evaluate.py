"""Evaluate models on a dataset split: per-object records for the sphere baseline and each model.

`evaluate_models` goes through the objects once. Each object's views are read, and its
ground-truth surface loaded and sampled, once for the sphere and every model; each model turns
view 0 into a mesh and novel-view renders, scored against the truth (`utils.evaluation.metrics`)
and, with paper_protocol, by the papers' protocol on the same surface points
(`utils.evaluation.paper_protocol`), so no mesh is read back from disk or sampled twice.
`evaluate_model` and `sphere_records` are its one-model and sphere-only forms; `compare` and
`write_report` (utils.evaluation.report) turn the records into tables. evaluate.py and notebook
05 both use these.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import trimesh
from tqdm.auto import tqdm

from tsr.cameras import pixel_to_ray
from tsr.export import save_mesh
from tsr.model import RAY_CHUNK, TSR
from utils.data.dataset import MultiViewDataset, novel_views
from utils.data.meshes import load_mesh
from utils.evaluation.metrics import (
    N_SURFACE_POINTS,
    chromaticity_error,
    mask_iou,
    mesh_metrics,
    psnr,
    sample_surface,
    sphere_baseline,
)
from utils.evaluation.paper_protocol import paper_metrics

# TSR.extract_mesh's default: a band around the surface, margins measured to give the dense
# mesh (tsr/model.py). On the 60 test parts at 128^3, base + adapter (load 2-4): band 58 s,
# every mesh the dense one; "coarse_to_fine", used before, 41 s, but 6 base and 16 adapter
# meshes lost small parts (0.002 Chamfer-L1 at most); "dense" (every grid point) 214 s.
MESH_METHOD = "auto"
# Novel views are scored on every PIXEL_STRIDE-th pixel of every PIXEL_STRIDE-th row, a
# regular grid (validation does the same): stride 2 renders a quarter of the rays. On the 60
# test parts mean PSNR moved by 0.002 dB (0.04 dB at most per object), mask IoU by 0.0002;
# stride 3 biased PSNR by +0.055 dB. 1: every pixel.
PIXEL_STRIDE = 2
# Objects are scored this many at a time, in threads. One object's work (torch on small
# batches, single-threaded scipy and numpy) kept a 2-core CPU about half idle (CPU time 1.06x
# the wall time); torch, scipy's k-d trees and numpy release the GIL. Each object is seeded by
# `seed` alone, so the records are the same as one at a time (test).
EVAL_WORKERS = 2


def ground_truth_mesh(dataset: MultiViewDataset, object_id: str) -> trimesh.Trimesh:
    """The normalised ground-truth mesh prepare_data.py stored with the object (world frame)."""
    return load_mesh(dataset.root / object_id / "mesh.glb")


def pixel_grid(height: int, width: int, stride: int) -> torch.Tensor:
    """Every stride-th pixel of every stride-th row, centred in its stride x stride cell.
    -> (N, 2) as (row, column); stride 1 is every pixel, row by row"""
    rows = torch.arange(stride // 2, height, stride)
    columns = torch.arange(stride // 2, width, stride)
    return torch.cartesian_prod(rows, columns)


@torch.no_grad()
def render_pixels(
    model: TSR, scene_code: torch.Tensor, item: dict, views: list[int], pixels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The rays through `pixels` (N, 2) of the dataset cameras `views`, all views in one batch
    of rays rendered RAY_CHUNK at a time. -> rgb (V, N, 3), opacity (V, N, 1) on the CPU"""
    height, width = item["mask"].shape[1:]
    rays = [pixel_to_ray(item["c2w"][v], pixels, height, width, item["fovy_deg"]) for v in views]
    device = scene_code.device
    rays_o = torch.cat([origins for origins, _ in rays]).to(device)  # (V*N, 3)
    rays_d = torch.cat([directions for _, directions in rays]).to(device)
    chunks = [
        model.render_rays(scene_code, rays_o[i : i + RAY_CHUNK], rays_d[i : i + RAY_CHUNK])
        for i in range(0, len(rays_o), RAY_CHUNK)
    ]
    return {
        key: torch.cat([chunk[key] for chunk in chunks]).float().cpu().reshape(len(views), -1, n)
        for key, n in (("rgb", 3), ("opacity", 1))
    }


def _image_scores(rendered: dict, item: dict, views: list[int], pixels: torch.Tensor) -> dict:
    """Mean PSNR, mask IoU and colour (chromaticity) error over the novel views, on `pixels`
    (NaN without any view)."""
    if not views:
        return {"psnr": math.nan, "mask_iou": math.nan, "colour_error": math.nan}
    rows, columns = pixels[:, 0], pixels[:, 1]
    per_view = []
    for rgb, opacity, view in zip(rendered["rgb"], rendered["opacity"], views, strict=True):
        true_rgb, true_mask = item["rgb"][view][rows, columns], item["mask"][view][rows, columns]
        per_view.append(
            {
                "psnr": float(psnr(rgb, true_rgb)),
                "mask_iou": float(mask_iou(opacity, true_mask)),
                "colour_error": float(chromaticity_error(rgb, true_rgb, true_mask)),
            }
        )
    return {name: float(np.mean([scores[name] for scores in per_view])) for name in per_view[0]}


def _model_record(model: TSR, item: dict, truth: np.ndarray, pixels, settings: dict) -> tuple:
    """One object seen by one model: its mesh from view 0 and its novel-view renders, scored
    (and by the papers' protocol, with settings["paper_protocol"]). -> (record, mesh)"""
    started = time.perf_counter()
    device = next(model.parameters()).device
    scene_code = model.encode(item["cond_image"][None].to(device))  # (1, 3, C, 2P, 2P)
    mesh = model.extract_mesh(
        scene_code, True, resolution=settings["mc_resolution"], threshold=settings["threshold"],
        method=settings["mesh_method"],
    )[0]  # fmt: skip
    views = novel_views(item)
    rendered = render_pixels(model, scene_code[0], item, views, pixels) if views else {}
    predicted = sample_surface(mesh, settings["n_points"], settings["seed"])  # (n, 3)
    record = {
        "object_id": item["object_id"],
        **mesh_metrics(predicted, truth),
        **_image_scores(rendered, item, views, pixels),
        "n_novel_views": len(views),
        "n_faces": len(mesh.faces),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if settings["paper_protocol"]:
        record |= paper_metrics(predicted, truth)
    return record, mesh


def _sphere_render(item: dict, views: list[int], pixels, radius: float, colour) -> dict:
    """A flat-coloured sphere at the origin seen through `pixels` of the dataset cameras
    (ray-sphere test). -> rgb (V, N, 3), opacity (V, N, 1)"""
    height, width = item["mask"].shape[1:]
    rgb, opacity = [], []
    for view in views:
        rays_o, rays_d = pixel_to_ray(item["c2w"][view], pixels, height, width, item["fovy_deg"])
        along = (rays_o * rays_d).sum(-1)  # (N,): t of the closest approach
        miss_distance2 = (rays_o * rays_o).sum(-1) - along**2
        hit = ((miss_distance2 <= radius**2) & (along < 0))[:, None].float()  # (N, 1)
        rgb.append(hit * colour + (1 - hit))
        opacity.append(hit)
    return {"rgb": torch.stack(rgb), "opacity": torch.stack(opacity)} if views else {}


def _sphere_record(item: dict, truth: np.ndarray, pixels, settings: dict) -> dict:
    """The best single sphere (radius fitted to the ground truth by Chamfer-L1), coloured with
    the mean foreground colour of view 0, scored exactly like a model."""
    n_points, seed = settings["n_points"], settings["seed"]
    baseline = sphere_baseline(truth, n_points, seed)
    foreground = item["mask"][0] > 0.5
    colour = item["rgb"][0][foreground].mean(0) if foreground.any() else torch.full((3,), 0.5)
    views = novel_views(item)
    rendered = _sphere_render(item, views, pixels, baseline["radius"], colour)
    record = {
        "object_id": item["object_id"],
        **baseline,
        **_image_scores(rendered, item, views, pixels),
    }
    if settings["paper_protocol"]:  # as a mesh of the fitted radius, like a model's
        mesh = trimesh.creation.icosphere(subdivisions=4, radius=baseline["radius"])
        record |= paper_metrics(sample_surface(mesh, n_points, seed), truth)
    return record


@torch.no_grad()
def evaluate_models(
    models: dict[str, TSR],
    dataset: MultiViewDataset,
    sphere: bool = True,
    mc_resolution: int = 128,
    threshold: float | None = None,
    n_points: int = N_SURFACE_POINTS,
    seed: int = 0,
    mesh_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    mesh_method: str = MESH_METHOD,
    pixel_stride: int = PIXEL_STRIDE,
    paper_protocol: bool = False,
) -> dict[str, list[dict]]:
    """Records per object for the sphere baseline (`sphere`) and each model, in one pass.

    A record: mesh metrics (world frame and course variant), novel-view PSNR, mask IoU and
    colour error on the dataset's cameras (every `pixel_stride`-th pixel and row), and for a
    model its mesh size and seconds (the papers' protocol not counted). paper_protocol adds
    the papers' columns (paper_protocol.paper_metrics) on the same surface points. threshold
    None uses each model config's marching-cubes level; meshes go to
    mesh_dir/<model name>/<object>.glb. -> {"sphere": [...], name: [...]}
    """
    if sphere and "sphere" in models:
        raise ValueError("'sphere' names the baseline: give the model another name")
    if pixel_stride < 1:
        raise ValueError(f"pixel_stride must be >= 1 (1: every pixel), got {pixel_stride}")
    models = {name: model.to(device).eval() for name, model in models.items()}
    settings = {"mc_resolution": mc_resolution, "threshold": threshold, "n_points": n_points,
                "seed": seed, "mesh_method": mesh_method,
                "paper_protocol": paper_protocol}  # fmt: skip
    folders = {name: Path(mesh_dir) / name for name in models} if mesh_dir is not None else {}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {"sphere": []} if sphere else {}
    records |= {name: [] for name in models}

    @torch.no_grad()  # in each worker thread: grad mode is per thread
    def object_records(index: int) -> dict[str, dict]:  # the sphere's and each model's
        item = dataset[index]
        truth = sample_surface(ground_truth_mesh(dataset, item["object_id"]), n_points, seed)
        pixels = pixel_grid(*item["mask"].shape[1:], pixel_stride)
        scored = {"sphere": _sphere_record(item, truth, pixels, settings)} if sphere else {}
        for name, model in models.items():
            scored[name], mesh = _model_record(model, item, truth, pixels, settings)
            if name in folders:  # GLB: written 50x faster than OBJ (0.006 s vs 0.32 s a mesh)
                path = folders[name] / f"{item['object_id']}.glb"
                save_mesh(mesh, path)
                scored[name]["mesh"] = str(path)
        return scored

    with ThreadPoolExecutor(EVAL_WORKERS) as pool:
        in_order = pool.map(object_records, range(len(dataset)))
        bar = tqdm(
            in_order, total=len(dataset), desc=f"evaluating {', '.join(records)}", unit="object"
        )
        for scored in bar:
            for name, record in scored.items():
                records[name].append(record)
    return records


def evaluate_model(model: TSR, dataset: MultiViewDataset, name: str = "model", **settings):
    """One model's records (evaluate_models without the sphere); meshes, with mesh_dir, go to
    mesh_dir/<name>/."""
    return evaluate_models({name: model}, dataset, sphere=False, **settings)[name]


def sphere_records(
    dataset: MultiViewDataset, n_points: int = N_SURFACE_POINTS, seed: int = 0, **settings
) -> list[dict]:
    """The sphere baseline's records alone."""
    return evaluate_models({}, dataset, n_points=n_points, seed=seed, **settings)["sphere"]

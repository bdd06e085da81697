"""Evaluate models on a dataset split: per-object records, paired comparisons, a report.

`evaluate_model` turns each object's view 0 into a mesh and novel-view renders and scores them
against the ground truth (`utils.evaluation.metrics`); `sphere_records` scores the best single sphere the
same way; `compare` averages per model and pairs every model with the base object by object;
`write_report` writes metrics.json, metrics.md and metrics.png. evaluate.py and notebook 05
both use these.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from tqdm.auto import tqdm

from tsr.cameras import rays_from_c2w
from tsr.files import atomic_path
from tsr.model import TSR
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


def ground_truth_mesh(dataset: MultiViewDataset, object_id: str) -> trimesh.Trimesh:
    """The normalised ground-truth mesh prepare_data.py stored with the object (world frame)."""
    return load_mesh(dataset.root / object_id / "mesh.glb")


@torch.no_grad()
def render_view(model: TSR, scene_code: torch.Tensor, item: dict, view: int) -> dict:
    """Render one dataset camera. -> rgb (H, W, 3), opacity (H, W, 1) on the CPU"""
    height, width = item["mask"].shape[1:]
    c2w = item["c2w"][view : view + 1]
    rendered = model.render_cameras(scene_code, c2w, item["fovy_deg"], height, width)
    return {key: rendered[key][0].float().cpu() for key in ("rgb", "opacity")}


def _image_scores(rendered: list[dict], item: dict, views: list[int]) -> dict[str, float]:
    """Mean PSNR, mask IoU and colour (chromaticity) error over the novel views (NaN without
    any)."""
    scores = {
        "psnr": lambda r, v: psnr(r["rgb"], item["rgb"][v]),
        "mask_iou": lambda r, v: mask_iou(r["opacity"], item["mask"][v]),
        "colour_error": lambda r, v: chromaticity_error(r["rgb"], item["rgb"][v], item["mask"][v]),
    }
    return {
        name: float(np.mean([score(r, v) for r, v in zip(rendered, views, strict=True)]))
        if views
        else math.nan
        for name, score in scores.items()
    }


@torch.no_grad()
def evaluate_model(
    model: TSR,
    dataset: MultiViewDataset,
    mc_resolution: int = 128,
    threshold: float | None = None,
    n_points: int = N_SURFACE_POINTS,
    seed: int = 0,
    mesh_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    name: str = "model",
) -> list[dict]:
    """One record per object: mesh metrics (world frame and course variant), novel-view PSNR,
    mask IoU and colour error on the dataset's cameras, mesh size and time. Meshes go to
    mesh_dir as .obj.

    threshold None uses the model config's marching-cubes level.
    """
    model = model.to(device).eval()
    mesh_dir = Path(mesh_dir) if mesh_dir is not None else None
    if mesh_dir is not None:
        mesh_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(len(dataset)), desc=f"evaluating {name}", unit="object"):
        item = dataset[index]
        started = time.perf_counter()
        scene_code = model.encode(item["cond_image"][None].to(device))  # (1, 3, C, 2P, 2P)
        mesh = model.extract_mesh(scene_code, True, resolution=mc_resolution, threshold=threshold)[
            0
        ]
        truth = sample_surface(ground_truth_mesh(dataset, item["object_id"]), n_points, seed)
        views = novel_views(item)
        rendered = [render_view(model, scene_code[0], item, v) for v in views]
        record = {
            "object_id": item["object_id"],
            **mesh_metrics(mesh, truth, n_points, seed),
            **_image_scores(rendered, item, views),
            "n_novel_views": len(views),
            "n_faces": len(mesh.faces),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if mesh_dir is not None:
            with atomic_path(mesh_dir / f"{item['object_id']}.obj") as temporary:
                mesh.export(temporary)
            record["mesh"] = str(mesh_dir / f"{item['object_id']}.obj")
        records.append(record)
    return records


def _sphere_render(item: dict, view: int, radius: float, colour: torch.Tensor) -> dict:
    """A flat-coloured sphere at the origin seen from one dataset camera (ray-sphere test)."""
    height, width = item["mask"].shape[1:]
    rays_o, rays_d = rays_from_c2w(item["c2w"][view : view + 1], height, width, item["fovy_deg"])
    along = (rays_o * rays_d).sum(-1)  # (1, H, W): t of the closest approach
    miss_distance2 = (rays_o * rays_o).sum(-1) - along**2
    hit = ((miss_distance2 <= radius**2) & (along < 0))[0, ..., None].float()  # (H, W, 1)
    return {"rgb": hit * colour + (1 - hit), "opacity": hit}


def sphere_records(
    dataset: MultiViewDataset, n_points: int = N_SURFACE_POINTS, seed: int = 0
) -> list[dict]:
    """The best single sphere per object (radius fitted to the ground truth by Chamfer-L1),
    coloured with the mean foreground colour of view 0, scored exactly like a model."""
    records = []
    for index in tqdm(range(len(dataset)), desc="sphere baseline", unit="object"):
        item = dataset[index]
        truth = sample_surface(ground_truth_mesh(dataset, item["object_id"]), n_points, seed)
        baseline = sphere_baseline(truth, n_points, seed)
        foreground = item["mask"][0] > 0.5
        colour = item["rgb"][0][foreground].mean(0) if foreground.any() else torch.full((3,), 0.5)
        views = novel_views(item)
        rendered = [_sphere_render(item, v, baseline["radius"], colour) for v in views]
        records.append(
            {"object_id": item["object_id"], **baseline, **_image_scores(rendered, item, views)}
        )
    return records

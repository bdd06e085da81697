"""Evaluate models on a dataset split: per-object records, paired comparisons, a report.

`evaluate_model` turns each object's view 0 into a mesh and novel-view renders and scores them
against the ground truth (`utils.metrics`); `sphere_records` scores the best single sphere the
same way; `compare` averages per model and pairs every model with the base object by object;
`write_report` writes metrics.json, metrics.md and metrics.png. evaluate.py and notebook 05
both use these.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import trimesh
from tqdm.auto import tqdm

from tsr.cameras import rays_from_c2w
from tsr.model import TSR

from .data import MultiViewDataset, load_mesh
from .metrics import (
    N_SURFACE_POINTS,
    chromaticity_error,
    mask_iou,
    mesh_metrics,
    paired_difference,
    psnr,
    sample_surface,
    sphere_baseline,
)
from .plots import figure_png, metrics_bar_plot

# metric key -> (label, which way is better); the order of the report's columns
METRICS = {
    "chamfer_l1": ("Chamfer-L1", "lower"),
    "f@0.05": ("F@0.05", "higher"),
    "f@0.1": ("F@0.1", "higher"),
    "psnr": ("novel-view PSNR (dB)", "higher"),
    "mask_iou": ("mask IoU", "higher"),
    "colour_error": ("colour error", "lower"),
    "course_chamfer": ("course Chamfer", "lower"),
    "course_f@0.1": ("course F@0.1", "higher"),
    "course_f@0.2": ("course F@0.2", "higher"),
    "course_f@0.5": ("course F@0.5", "higher"),
}
PLOTTED = ("chamfer_l1", "f@0.05", "f@0.1", "psnr", "mask_iou", "colour_error")
RAY_CHUNK = 16384  # rays per render_rays call: bounds memory at any image size


def ground_truth_mesh(dataset: MultiViewDataset, object_id: str) -> trimesh.Trimesh:
    """The normalised ground-truth mesh prepare_data.py stored with the object (world frame)."""
    return load_mesh(dataset.root / object_id / "mesh.glb")


def novel_views(item: dict) -> list[int]:
    """Positions in the item's views of every view except the conditioning view 0."""
    return [i for i, view in enumerate(item["view_indices"].tolist()) if view != 0]


@torch.no_grad()
def render_view(model: TSR, scene_code: torch.Tensor, item: dict, view: int) -> dict:
    """Render one dataset camera. -> rgb (H, W, 3), opacity (H, W, 1) on the CPU"""
    height, width = item["mask"].shape[1:]
    device = scene_code.device
    rays_o, rays_d = rays_from_c2w(item["c2w"][view : view + 1], height, width, item["fovy_deg"])
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)  # (H*W, 3)
    chunks = [
        model.render_rays(
            scene_code, rays_o[i : i + RAY_CHUNK].to(device), rays_d[i : i + RAY_CHUNK].to(device)
        )
        for i in range(0, len(rays_o), RAY_CHUNK)
    ]
    return {
        key: torch.cat([c[key] for c in chunks]).float().cpu().reshape(height, width, -1)
        for key in ("rgb", "opacity")
    }


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
            mesh.export(mesh_dir / f"{item['object_id']}.obj")
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


def _mean_stderr(values: list[float]) -> dict[str, float | int]:
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(finite)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "stderr": float(finite.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "n": n,
    }


def compare(records: dict[str, list[dict]], base: str = "base") -> dict:
    """Per-model means with standard errors, and every other model minus `base`, paired by
    object (so differences between objects do not count as noise). -> summary dict"""
    if base not in records:
        raise ValueError(f"no records for the base model {base!r}; models: {sorted(records)}")
    base_ids = [r["object_id"] for r in records[base]]
    summary = {"metrics": METRICS, "base": base, "models": {}, "paired": {}, "objects": records}
    for model, rows in records.items():
        summary["models"][model] = {m: _mean_stderr([r.get(m) for r in rows]) for m in METRICS}
        summary["models"][model]["empty_meshes"] = sum(bool(r.get("empty")) for r in rows)
        if model == base:
            continue
        by_id = {r["object_id"]: r for r in rows}
        if sorted(by_id) != sorted(base_ids):
            raise ValueError(f"{model!r} and {base!r} were evaluated on different objects")
        summary["paired"][f"{model} - {base}"] = {
            m: paired_difference(
                [r.get(m, math.nan) for r in records[base]],
                [by_id[i].get(m, math.nan) for i in base_ids],
            )
            for m in METRICS
        }
    return summary


def _cell(stats: dict, signed: bool = False) -> str:
    if not stats["n"]:
        return "–"
    mean = f"{stats['mean']:+.4f}" if signed else f"{stats['mean']:.4f}"
    return mean if math.isnan(stats["stderr"]) else f"{mean} ± {stats['stderr']:.4f}"


def _verdict(stats: dict, better: str) -> str:
    """'better'/'worse' only when the paired mean is more than 2 standard errors from zero."""
    if not stats["n"] or math.isnan(stats["stderr"]) or abs(stats["mean"]) <= 2 * stats["stderr"]:
        return "within noise"
    improved = stats["mean"] < 0 if better == "lower" else stats["mean"] > 0
    return "better" if improved else "worse"


def markdown_report(summary: dict, settings: dict | None = None) -> str:
    """Tables: mean ± standard error per model, then paired differences with a verdict."""
    header = "| model | " + " | ".join(f"{label} ({b})" for label, b in METRICS.values()) + " |"
    lines = ["# Evaluation", "", header, "|---" * (len(METRICS) + 1) + "|"]
    for model, stats in summary["models"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(stats[m]) for m in METRICS) + " |")
    lines += ["", "Mean ± standard error over objects (n in metrics.json)."]
    for pair, stats in summary["paired"].items():
        lines += [
            "",
            f"## Paired per-object difference: {pair}",
            "",
            "| metric | mean ± se | n | verdict |",
            "|---|---|---|---|",
        ]
        for metric, (label, better) in METRICS.items():
            s = stats[metric]
            lines.append(
                f"| {label} | {_cell(s, signed=True)} | {s['n']} | {_verdict(s, better)} |"
            )
    lines += [
        "",
        "Chamfer-L1 = ½(mean nearest-neighbour distance predicted→truth + truth→predicted) on "
        "surface points (10,000 unless the settings say otherwise) in the shared world frame; "
        "F@τ on the same points. Colour error: mean L1 between the chromaticities "
        "rgb / (r + g + b) of render and truth on the true object's pixels of the novel "
        "views (hue, not brightness). 'course' columns normalise each cloud by itself (centroid, "
        "max |coordinate|) as the course project did, which hides scale and offset errors. The "
        "sphere is the best origin-centred sphere per object, in its mean view-0 colour. "
        "'better'/'worse': the paired mean is more than 2 standard errors from zero.",
    ]
    if settings:
        lines += ["", "Settings: `" + json.dumps(settings, default=str) + "`"]
    return "\n".join(lines) + "\n"


def write_report(
    summary: dict, out_dir: str | Path, settings: dict | None = None
) -> dict[str, Path]:
    """metrics.json (everything, per object included), metrics.md and metrics.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "markdown": out_dir / "metrics.md",
        "plot": out_dir / "metrics.png",
    }
    document = {
        **summary,
        "metrics": {k: list(v) for k, v in METRICS.items()},
        "settings": settings or {},
    }
    paths["json"].write_text(json.dumps(document, indent=2, default=str, allow_nan=True))
    paths["markdown"].write_text(markdown_report(summary, settings))
    table = {
        model: {
            m: (stats[m]["mean"], 0.0 if math.isnan(stats[m]["stderr"]) else stats[m]["stderr"])
            for m in PLOTTED
        }
        for model, stats in summary["models"].items()
    }
    paths["plot"].write_bytes(figure_png(metrics_bar_plot(table, PLOTTED)))
    return paths


@torch.no_grad()
def best_threshold_by_chamfer(
    model: TSR,
    dataset: MultiViewDataset,
    around: float | None = None,
    factors: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
    n_objects: int = 16,
    resolution: int = 64,
    n_points: int = 4000,
    seed: int = 0,
) -> tuple[float, dict[str, dict[str, float]]]:
    """The marching-cubes level with the lowest mean Chamfer-L1 on `n_objects` objects.

    The density grid of each object is computed once and meshed at every candidate level
    (`around` x `factors`; `around` defaults to the model's own). -> (best level, scores by
    level: mean chamfer_l1 and f@0.05 over objects; an empty mesh counts as chamfer 1.0)
    """
    from tsr.marching_cubes import marching_cubes

    around = model.config.mc_threshold if around is None else around
    levels = [around * factor for factor in factors]
    radius = model.config.renderer.radius
    device = next(model.parameters()).device
    axis = torch.linspace(-radius, radius, resolution, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    totals = {level: {"chamfer_l1": 0.0, "f@0.05": 0.0} for level in levels}
    n_objects = min(n_objects, len(dataset))
    for index in tqdm(range(n_objects), desc="choosing the threshold", unit="object"):
        item = dataset[index]
        code = model.encode(item["cond_image"][None].to(device))[0]
        density = model.renderer.query_triplane(model.decoder, grid, code)["density_act"]
        volume = density.reshape(resolution, resolution, resolution).cpu()
        truth = sample_surface(ground_truth_mesh(dataset, item["object_id"]), n_points, seed)
        for level in levels:
            verts, faces = marching_cubes(volume, level)
            mesh = trimesh.Trimesh(verts / (resolution - 1) * 2 * radius - radius, faces)
            scores = mesh_metrics(mesh, truth, n_points, seed)
            chamfer = scores["chamfer_l1"] if math.isfinite(scores["chamfer_l1"]) else 1.0
            totals[level]["chamfer_l1"] += chamfer / n_objects
            totals[level]["f@0.05"] += scores["f@0.05"] / n_objects
    best = min(levels, key=lambda level: totals[level]["chamfer_l1"])
    return float(best), {f"{level:g}": values for level, values in totals.items()}

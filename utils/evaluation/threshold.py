"""The marching-cubes level to mesh a model at: its own level when its field crosses it
(`choose_threshold`, with a fallback for untrained models), or, to calibrate a model, the
level with the best Chamfer on validation objects (`best_threshold_by_chamfer`)."""

from __future__ import annotations

import math

import torch
import trimesh
from tqdm.auto import tqdm

from tsr import mesh as mesh_extraction
from tsr.model import TSR
from utils.data.dataset import MultiViewDataset
from utils.evaluation.evaluate import ground_truth_mesh
from utils.evaluation.metrics import mesh_metrics, sample_surface


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
    axis = mesh_extraction.grid_axis(resolution, radius, device)
    grid = torch.cartesian_prod(axis, axis, axis)  # (R^3, 3), x slowest
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
            world = mesh_extraction.grid_to_world(verts, resolution, radius)
            mesh = trimesh.Trimesh(world, faces)
            scores = mesh_metrics(mesh, truth, n_points, seed)
            chamfer = scores["chamfer_l1"] if math.isfinite(scores["chamfer_l1"]) else 1.0
            totals[level]["chamfer_l1"] += chamfer / n_objects
            totals[level]["f@0.05"] += scores["f@0.05"] / n_objects
    best = min(levels, key=lambda level: totals[level]["chamfer_l1"])
    return float(best), {f"{level:g}": values for level, values in totals.items()}


@torch.no_grad()
def choose_threshold(model: TSR, scene_codes: torch.Tensor, quantile: float = 0.9) -> float:
    """The model's own marching-cubes level when every scene's density crosses it, else the
    `quantile` of the first scene's density on a 32^3 grid (an untrained model's density never
    reaches a trained one's level, and its mesh would be empty)."""
    axis = mesh_extraction.grid_axis(32, model.config.renderer.radius, scene_codes.device)
    grid = torch.cartesian_prod(axis, axis, axis)  # (32^3, 3)
    fields = [
        model.renderer.query_triplane(model.decoder, grid, code)["density_act"][:, 0].float()
        for code in scene_codes
    ]
    level = model.config.mc_threshold
    if all(field.min() < level < field.max() for field in fields):
        return level
    chosen = float(fields[0].quantile(quantile))
    low, high = float(fields[0].min()), float(fields[0].max())
    print(
        f"the model's threshold {level:g} is outside its density range [{low:.3g}, {high:.3g}] "
        f"here (an untrained model?): using the {quantile:.0%} quantile, {chosen:.3g}"
    )
    return chosen

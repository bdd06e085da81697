"""How wide must the surface band be? Misses and queries of band rules on real TSR fields.

`TSR.extract_mesh` queries only a band around the surface ("band" in tsr/mesh.py): a coarse
grid every `step` points, then every point of the cells whose corners change sign or come
within a factor e^log_margin of the threshold, dilated by `dilation` cells. No bound on the
decoder proves a band exact, so its width is measured here: for each object of a dataset
split, the dense grid of the model's density, then for each rule the coarse cells that hold a
fine threshold crossing but were not selected (each one changes the mesh) and the share of
coarse cells selected (about the share of the grid queried).

    python benchmarks/bench_band.py --data data/parts --resolution 128
    python benchmarks/bench_band.py --data data/parts --adapter outputs_lora/workbook/adapter
    python benchmarks/bench_band.py --data data/parts --resolution 256 --objects 8 --steps 2 4 8

Prints one row per rule: meshes that would differ from the dense one, missed cells in all,
and the mean share of coarse cells selected.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tsr import TSR
from tsr.grid_sampling import CoarseToFine, GridQuery, coarse_ids
from tsr.mesh import grid_axis
from utils.data.dataset import MultiViewDataset


def density_grid(model: TSR, scene_code: torch.Tensor, resolution: int) -> torch.Tensor:
    """(R, R, R) density_act at every grid point, x slowest."""
    axis = grid_axis(resolution, model.config.renderer.radius)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    density = [
        model.renderer.query_triplane(model.decoder, points[i : i + 65536], scene_code)
        for i in range(0, len(points), 65536)
    ]
    return torch.cat([d["density_act"][:, 0] for d in density]).view((resolution,) * 3)


def band_of(
    grid: torch.Tensor, threshold: float, radius: float, step: int, margins
) -> CoarseToFine:
    """tsr.mesh's band sampler run on a precomputed grid (its queries read the grid)."""
    resolution = grid.shape[0]
    axis = grid_axis(resolution, radius)

    def lookup(points: torch.Tensor) -> torch.Tensor:  # points are grid points: exact indices
        ijk = torch.searchsorted(axis, points.contiguous())
        return grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]]

    query = GridQuery(lookup, threshold, 1 << 20, None, torch.tensor([math.inf, -math.inf]))
    log_margin, dilation = margins
    return CoarseToFine(query, axis, step, dilation, log_margin)


def crossing_cells(grid: torch.Tensor, threshold: float, band: CoarseToFine) -> torch.Tensor:
    """Coarse cells of `band` that hold a fine cell whose corners change sign. -> (K-1,)^3"""
    resolution = grid.shape[0]
    inside_share = F.avg_pool3d((grid > threshold).float()[None, None], 2, stride=1)[0, 0]
    fine_crossing = (inside_share > 0) & (inside_share < 1)  # (R-1,)^3
    ids = coarse_ids(resolution, band.step, grid.device)
    coarse_cell_of = torch.bucketize(torch.arange(resolution - 1), ids[1:], right=True)
    coarse_cell_of = coarse_cell_of.clamp(max=len(ids) - 2)
    needed = torch.zeros_like(band.selected)
    where = fine_crossing.nonzero()
    needed[tuple(coarse_cell_of[where[:, d]] for d in range(3))] = True
    return needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/parts", help="a dataset folder (prepare_data.py)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--model", default="classroom")
    parser.add_argument("--adapter", help="a LoRA adapter to measure instead of the base model")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--objects", type=int, default=60, help="the first N of the split")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--log-margins", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--dilations", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()

    model = TSR.from_pretrained(args.model)
    if args.adapter:
        from utils.training.adapters import load_adapter

        model = load_adapter(model, args.adapter)
    model.eval()
    dataset = MultiViewDataset(args.data, args.split, cond_size=model.config.cond_image_size)
    n_objects = min(args.objects, len(dataset))
    threshold, radius = model.config.mc_threshold, model.config.renderer.radius
    rules = list(itertools.product(args.steps, args.log_margins, args.dilations))
    differing = dict.fromkeys(rules, 0)
    missed = dict.fromkeys(rules, 0)
    selected_share = dict.fromkeys(rules, 0.0)
    start = time.perf_counter()
    for index in tqdm(range(n_objects), desc="dense grids", unit="object"):
        item = dataset[index]
        with torch.no_grad():
            code = model.encode(item["cond_image"][None])[0]
            grid = density_grid(model, code, args.resolution)
        for rule in rules:
            step, *margins = rule
            band = band_of(grid, threshold, radius, step, margins)
            misses = int((crossing_cells(grid, threshold, band) & ~band.selected).sum())
            differing[rule] += misses > 0
            missed[rule] += misses
            selected_share[rule] += float(band.selected.float().mean()) / n_objects
    print(
        f"{args.adapter or args.model} at {args.resolution}^3, {n_objects} {args.split} objects, "
        f"{time.perf_counter() - start:.0f} s"
    )
    print(
        f"{'step':>4} {'log margin':>10} {'dilation':>8} {'differing':>9} {'missed':>6} {'selected':>8}"
    )
    for rule in rules:
        step, log_margin, dilation = rule
        print(
            f"{step:>4} {log_margin:>10g} {dilation:>8} {differing[rule]:>6}/{n_objects:<2} "
            f"{missed[rule]:>6} {selected_share[rule]:>8.3f}"
        )


if __name__ == "__main__":
    main()

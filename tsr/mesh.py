"""Mesh extraction for any density function: grid queries -> marching cubes -> trimesh.

The grid is TripoSR's: `linspace(0, 1, R)` per axis, x slowest, scaled to [-radius, radius];
the surface is `density == threshold`, inside is `density > threshold` (a field that is
lower inside gives an inside-out mesh: negate it first). The grid is queried densely (as
TripoSR), or only near the surface (tsr.grid_sampling), in one volume or in blocks welded at
their seams; see `extract_isosurface`. Coordinates are never built for the whole grid: each
chunk makes its points from flat indices, and results go straight into a preallocated level
volume (`density - threshold`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from tqdm.auto import tqdm

from tsr.certified_sampling import Certified
from tsr.grid_sampling import CoarseToFine, DensityFn, GridQuery, sample_dense
from tsr.marching_cubes import marching_cubes_level, resolve_backend, weld_block_seams
from tsr.mesh_cost import Estimate
from tsr.renderer import DECODER_CHUNK

ColorFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world points -> (N, 3) in [0, 1]

METHODS = ("auto", "dense", "band", "coarse_to_fine", "certified", "blocks")
# Points per density_fn call when chunk_size is None. On a 2-core CPU a TripoSR-sized
# decoder is fastest at 8192-16384 points (larger chunks fall out of cache: 32768 costs 1.35x,
# 262144 3x); a GPU wants larger chunks to fill it (131072 = a few tens of MB of activations;
# not measured here).
CHUNK_SIZE_CPU = DECODER_CHUNK
CHUNK_SIZE_CUDA = 131072
DEFAULT_CHUNK_SIZE = None  # per device, as above
# "auto" keeps one volume up to this size (R = 406), then switches to blocks.
AUTO_DENSE_MAX_BYTES = 256 * 2**20
# The progress bar appears only once an extraction has run this long, so quick ones stay quiet.
PROGRESS_DELAY_SECONDS = 2.0


@dataclass
class MeshExtraction:
    verts: np.ndarray  # (V, 3) float32 world coordinates
    faces: np.ndarray  # (F, 3) int64, outward-facing
    n_queries: int  # density evaluations made (dense: R^3)
    resolution: int
    method: str  # the method used ("auto" resolved)
    backend: str  # the marching-cubes backend used
    n_blocks: int  # volumes meshed (1 unless blocks)
    density_range: tuple[float, float]  # min and max density seen, to choose a threshold
    query_seconds: float  # time in density queries (including index and fill work)
    marching_seconds: float  # time in marching cubes and welding

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0


def grid_axis(resolution: int, radius: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(R,) world coordinate of each grid plane, the same along x, y and z.

    matches TripoSR: linspace on the CPU, then `t * (2r) + (-r)` in float32 on the device.
    """
    unit = torch.linspace(0.0, 1.0, resolution).to(device)
    return unit * (2 * radius) + -radius


def grid_to_world(verts: np.ndarray, resolution: int, radius: float) -> np.ndarray:
    """Marching-cubes vertices in grid units (0 .. R-1) -> world coordinates. (V, 3) -> (V, 3)

    matches TripoSR: float32 grid units / (R - 1), then t * (2r) + (-r) in float32 (torch), the
    same arithmetic as `grid_axis`, so a vertex on a grid plane lands exactly on it.
    """
    world = torch.from_numpy(np.asarray(verts, dtype=np.float32)) / (resolution - 1.0)
    return (world * (2 * radius) + -radius).numpy()


def default_chunk_size(device: torch.device | str | None) -> int:
    return CHUNK_SIZE_CUDA if torch.device(device or "cpu").type == "cuda" else CHUNK_SIZE_CPU


def _block_ranges(resolution: int, block_cells: int) -> list[tuple[int, int]]:
    """Inclusive point ranges along one axis; neighbours share their boundary plane."""
    return [
        (a, min(a + block_cells, resolution - 1)) for a in range(0, resolution - 1, block_cells)
    ]


def _empty_surface_message(threshold: float, low: float, high: float) -> str:
    if high <= threshold:
        where = f"above the whole field (density max {high:.4g}): nothing is inside"
        fix = f"lower the threshold below {high:.4g}"
    elif low >= threshold:
        where = f"below the whole field (density min {low:.4g}): everything is inside"
        fix = f"raise the threshold above {low:.4g}"
    else:
        where = f"inside the field range [{low:.4g}, {high:.4g}] but no grid cell crosses it"
        fix = "use method='dense' or a higher resolution"
    return f"empty mesh: threshold {threshold} is {where}; {fix} (TripoSR uses 25.0)."


def extract_isosurface(
    density_fn: DensityFn,
    resolution: int = 256,
    threshold: float = 25.0,
    radius: float = 0.87,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    method: str = "auto",
    block_resolution: int | None = None,
    coarse_step: int = 4,
    margin: int = 1,
    lipschitz: float | None = None,
    log_margin: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> MeshExtraction:
    """Mesh of the surface `density_fn == threshold` (inside > threshold) on an R^3 grid.

    method: how points are queried and the volume tiled.
      "dense": all R^3 points, one volume (TripoSR's way, bit-exact to it).
      "blocks": all points, in blocks of `block_resolution` cells (default 128): same mesh as
        "dense" up to vertex order, memory of one block.
      "certified": the mesh of "dense", querying only near the surface. Needs `lipschitz`,
        an upper bound on |density(a) - density(b)| / |a - b| (world units) inside the box:
        coarse grids, refined down to `coarse_step` points where the bound cannot rule the
        surface out (tsr.certified_sampling). The guarantee is the bound's: a smaller
        one than the field's true slope can drop islands and thin parts.
      "band": for a positive density and threshold (TSR's). A coarse grid every
        `coarse_step` points, then all points of the cells where it changes sign or comes
        within a factor e^`log_margin` of the threshold, dilated by `margin` cells. A margin,
        not a proof: an island rising from below threshold/e^log_margin to above the
        threshold between two coarse samples is missed (tsr.model measures its margins).
      "coarse_to_fine": "band" without log_margin: only the sign changes (and `margin`
        cells around them). Misses islands farther than `margin` cells from the rest of the
        surface and parts thinner than about `coarse_step` voxels.
      "auto": "certified" when `lipschitz` is given, "band" when `log_margin` is, else
        "dense"; tiled in blocks above AUTO_DENSE_MAX_BYTES.
    block_resolution: block size in cells; given, it tiles any method; None tiles "blocks",
    and every method but "dense" when one volume would exceed AUTO_DENSE_MAX_BYTES.
    chunk_size: points per density_fn call (0 = all at once; None = CHUNK_SIZE_CPU or
    CHUNK_SIZE_CUDA). device: where points are made, density_fn and marching cubes run.
    progress: a tqdm bar over query chunks (one volume) or blocks, shown once the extraction
    has run PROGRESS_DELAY_SECONDS. An extraction estimated to exceed WARN_ABOVE_SECONDS or
    WARN_ABOVE_MEMORY_SHARE of the free memory warns first, with its numbers.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    if coarse_step < 1 or margin < 0 or (block_resolution is not None and block_resolution < 1):
        raise ValueError(
            f"need coarse_step >= 1, margin >= 0 and block_resolution >= 1 (or None), got "
            f"{coarse_step}, {margin} and {block_resolution}"
        )
    if log_margin is not None and not (log_margin >= 0 and threshold > 0):
        raise ValueError(
            f"log_margin is a band in log(density / threshold): it needs log_margin >= 0 and "
            f"a positive threshold, got {log_margin} and {threshold}"
        )
    if method == "band" and log_margin is None:
        raise ValueError("method 'band' needs log_margin=, how near the threshold is 'near'")
    if lipschitz is not None and not lipschitz > 0:
        raise ValueError(f"lipschitz must be a positive bound on the density's slope: {lipschitz}")
    if method == "certified" and lipschitz is None:
        raise ValueError(
            "method 'certified' needs lipschitz=, a bound on how fast the density changes per "
            "world unit; without one use method='dense' (or 'auto', which falls back to it)"
        )
    backend = resolve_backend(backend)
    too_big = 4 * resolution**3 > AUTO_DENSE_MAX_BYTES
    if block_resolution is None and (method == "blocks" or (method != "dense" and too_big)):
        block_resolution = 128
    if method == "auto":
        method = "certified" if lipschitz else "band" if log_margin is not None else "dense"
    if method == "dense" and block_resolution is not None:
        method = "blocks"
    block_cells = min(block_resolution or resolution - 1, resolution - 1)
    ranges = _block_ranges(resolution, block_cells)
    device = torch.device(device or "cpu")
    chunk_size = default_chunk_size(device) if chunk_size is None else chunk_size

    blocks = [(rx, ry, rz) for rx in ranges for ry in ranges for rz in ranges]
    # One volume: a bar over its query chunks. Blocks: a bar over blocks.
    one_volume = len(blocks) == 1
    bar = tqdm(
        desc=f"mesh {resolution}^3 {method}",
        unit="chunk" if one_volume else "block",
        disable=not progress,
        delay=PROGRESS_DELAY_SECONDS,
    )
    bar.total = None if one_volume else len(blocks)
    chunk_bar = bar if one_volume else None
    estimate = Estimate(resolution, method, len(blocks), block_cells, coarse_step, device)
    estimate.warn_if_short_of_memory()

    query_seconds = marching_seconds = 0.0
    block_verts, block_faces, n_verts = [], [], 0
    seam_tolerance = 0.0  # grid units within which two seam vertices are one
    with torch.inference_mode():
        axis = grid_axis(resolution, radius, device)  # (R,)
        seen = torch.tensor([torch.inf, -torch.inf], device=device)
        query = GridQuery(density_fn, threshold, chunk_size, chunk_bar, seen)
        tick = time.perf_counter()
        sample = sample_dense
        n_queries = resolution**3
        if method not in ("dense", "blocks"):
            band = (
                Certified(query, axis, coarse_step, lipschitz)
                if method == "certified"
                else CoarseToFine(
                    query, axis, coarse_step, margin, log_margin if method == "band" else None
                )
            )
            sample, n_queries = band.sample, band.fine_queries_estimate
        if query.seconds_per_point is None:
            query.after_warm_chunk = lambda rate: estimate.warn_if_slow(n_queries, rate)
        else:
            estimate.warn_if_slow(n_queries, query.seconds_per_point)
        query_seconds += time.perf_counter() - tick
        for block in blocks:
            tick = time.perf_counter()
            lo, hi = zip(*block, strict=True)
            level = sample(query, axis, lo, hi)  # (X, Y, Z)
            tock = time.perf_counter()
            query_seconds += tock - tick
            if not one_volume:
                # A value exactly at the threshold puts several edges' vertices on one grid
                # point, and a seam cannot tell them apart by position. Moving it just
                # outside (where PyMCubes already counts it) keeps the topology and makes
                # them distinct. One volume is left bit-exact to TripoSR.
                level[level == 0] = -max(abs(threshold), 1.0) * 2**-20
            verts, faces = marching_cubes_level(level, backend)
            if len(faces):
                # Copies of a seam vertex differ by rounding: in the backend's local
                # coordinates, then in adding the block offset (float64).
                ulps = (
                    np.finfo(verts.dtype).eps * block_cells + np.finfo(np.float64).eps * resolution
                )
                seam_tolerance = max(seam_tolerance, 4 * ulps)
                block_verts.append(verts.astype(np.float64) + np.array(lo, np.float64))
                block_faces.append(faces + n_verts)
                n_verts += len(verts)
            marching_seconds += time.perf_counter() - tock
            if not one_volume:
                bar.update(1)
    bar.close()

    tick = time.perf_counter()
    verts = np.concatenate(block_verts) if block_verts else np.zeros((0, 3))
    faces = np.concatenate(block_faces) if block_faces else np.zeros((0, 3), np.int64)
    if not one_volume:
        seams = np.array([b for _, b in ranges[:-1]], np.float64)
        verts, faces = weld_block_seams(verts, faces, seams, seam_tolerance)
    world = grid_to_world(verts, resolution, radius)
    marching_seconds += time.perf_counter() - tick
    low, high = seen.tolist()
    if len(faces) == 0:
        warnings.warn(_empty_surface_message(threshold, low, high), stacklevel=2)
    return MeshExtraction(
        verts=world,
        faces=faces,
        n_queries=query.n_queries,
        resolution=resolution,
        method=method,
        backend=backend,
        n_blocks=len(blocks),
        density_range=(low, high),
        query_seconds=query_seconds,
        marching_seconds=marching_seconds,
    )


def build_trimesh(
    verts: np.ndarray,
    faces: np.ndarray,
    color_fn: ColorFn | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    device: torch.device | str | None = None,
) -> trimesh.Trimesh:
    """trimesh.Trimesh (process=True, as TripoSR) with vertex colours = color_fn(verts).

    An empty mesh gives an empty Trimesh; color_fn is then not called (TripoSR crashes).
    """
    colors = None
    if color_fn is not None and len(verts) > 0:
        points = torch.as_tensor(verts, dtype=torch.float32, device=device or "cpu")  # (V, 3)
        chunk_size = default_chunk_size(device) if chunk_size is None else chunk_size
        step = chunk_size if chunk_size > 0 else len(points)
        with torch.inference_mode():
            colors = torch.cat(
                [color_fn(points[i : i + step]) for i in range(0, len(points), step)]
            )
        colors = colors.float().cpu().numpy()  # (V, 3) in [0, 1]; trimesh stores uint8 RGBA
    return trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colors)

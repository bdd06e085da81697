"""Mesh extraction for any density function: grid queries -> marching cubes -> trimesh.

The grid is TripoSR's: `linspace(0, 1, R)` per axis, x slowest, scaled to [-radius, radius];
the surface is `density == threshold`, inside is `density > threshold` (a field that is
lower inside gives an inside-out mesh: negate it first). The grid is queried densely (as
TripoSR), or coarse-to-fine, in one volume or in blocks welded at their seams; see
`extract_isosurface`. Coordinates are never built for the whole grid: each chunk makes its
points from flat indices, and results go straight into a preallocated level volume
(`density - threshold`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from tqdm.auto import tqdm

from tsr.marching_cubes import marching_cubes_level, resolve_backend, weld_block_seams

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world points -> (N,) density
ColorFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) world points -> (N, 3) in [0, 1]

METHODS = ("auto", "dense", "coarse_to_fine", "blocks")
# Points per density_fn call when chunk_size is None. On a 2-core CPU a TripoSR-sized
# decoder is fastest at 8192-16384 points (larger chunks fall out of cache: 32768 costs 1.35x,
# 262144 3x); a GPU wants larger chunks to fill it (131072 = a few tens of MB of activations;
# not measured here).
CHUNK_SIZE_CPU = 8192
CHUNK_SIZE_CUDA = 131072
DEFAULT_CHUNK_SIZE = None  # per device, as above
# "auto" keeps one volume up to this size (R = 406), then switches to blocks.
AUTO_DENSE_MAX_BYTES = 256 * 2**20


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


def default_chunk_size(device: torch.device | str | None) -> int:
    return CHUNK_SIZE_CUDA if torch.device(device or "cpu").type == "cuda" else CHUNK_SIZE_CPU


@dataclass
class _GridQuery:
    """density_fn on grid points, written as `density - threshold` into level volumes."""

    density_fn: DensityFn
    threshold: float
    chunk_size: int
    bar: tqdm | None  # advanced once per chunk, when given
    seen: torch.Tensor  # (2,) min and max density queried so far, kept on the device
    n_queries: int = 0

    def __call__(self, axes, out: torch.Tensor, point_ids: torch.Tensor | None = None) -> None:
        """Fill out (X*Y*Z,), the flat level volume of the grid `axes[0] x axes[1] x axes[2]`
        (x slowest), at point_ids (flat indices; all points when None).
        """
        n_points = out.numel() if point_ids is None else point_ids.numel()
        step = self.chunk_size if self.chunk_size > 0 else max(n_points, 1)
        chunks = list(self._chunks(axes, step, point_ids))
        if self.bar is not None:
            self.bar.total = (self.bar.total or 0) + len(chunks)
            self.bar.refresh()
        for target, make_points in chunks:
            points = make_points()  # (N, 3)
            density = self.density_fn(points)
            if density.numel() != len(points):
                raise ValueError(
                    f"density_fn returned shape {tuple(density.shape)} for {len(points)} points: "
                    "it must return one density per point, shaped (N,) or (N, 1)"
                )
            density = density.reshape(-1).float()
            out[target] = density - self.threshold  # in float32, as TripoSR
            low, high = torch.aminmax(density)
            self.seen[0], self.seen[1] = self.seen[0].minimum(low), self.seen[1].maximum(high)
            if self.bar is not None:
                self.bar.update(1)
        self.n_queries += n_points

    @staticmethod
    def _chunks(axes, step: int, point_ids: torch.Tensor | None):
        """(where in the flat volume, a function making the chunk's points) per chunk.

        All points: whole x-slabs are built from one precomputed (y, z) plane by slicing, so
        a chunk costs no index arithmetic (TripoSR's loop slices a prebuilt grid; this is as
        cheap without building it). Chosen points: coordinates from their flat indices.
        """
        nx, ny, nz = (len(a) for a in axes)
        if point_ids is not None:
            for start in range(0, point_ids.numel(), step):
                ids = point_ids[start : start + step]

                def make(ids=ids):
                    x, y, z = ids // (ny * nz), (ids // nz) % ny, ids % nz
                    return torch.stack([axes[0][x], axes[1][y], axes[2][z]], dim=-1)

                yield ids, make
            return
        plane = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)
        size = len(plane)  # Y*Z points per x-slab
        slabs = max(1, step // size)  # whole slabs per chunk when a slab is smaller than a chunk
        for x0 in range(0, nx, slabs):
            xs = axes[0][x0 : x0 + slabs]  # (S,)
            for start in range(0, size, step):
                rows = plane[start : start + step]  # (N, 2)
                first = x0 * size + start
                target = slice(first, first + len(xs) * len(rows))  # contiguous: x slowest

                def make(xs=xs, rows=rows):
                    x = xs.repeat_interleave(len(rows))[:, None]
                    return torch.cat([x, rows.repeat(len(xs), 1)], dim=-1)

                yield target, make


class _CoarseToFine:
    """The coarse pass over the whole grid, and fine sampling of any block from it.

    Every decision (which points to query, what to fill in) is a function of the global
    coarse grid, so two blocks agree on the points they share and their meshes weld.
    """

    def __init__(self, query: _GridQuery, axis: torch.Tensor, coarse_step: int, margin: int):
        resolution, device = len(axis), axis.device
        self.step = coarse_step
        # Fine indices of the coarse planes: every step-th one, plus the last.
        coarse_ids = torch.arange(0, resolution, coarse_step, device=device)
        if coarse_ids[-1] != resolution - 1:
            coarse_ids = torch.cat([coarse_ids, coarse_ids.new_tensor([resolution - 1])])
        self.n_coarse = len(coarse_ids)
        coarse_axis = axis[coarse_ids]
        self.coarse = torch.empty(self.n_coarse**3, device=device)
        query((coarse_axis,) * 3, self.coarse)
        self.coarse = self.coarse.view((self.n_coarse,) * 3)
        # A cell straddles when its 8 corners are not all on one side.
        inside = (self.coarse > 0).to(torch.float32)[None, None]  # (1, 1, K, K, K)
        inside_fraction = F.avg_pool3d(inside, kernel_size=2, stride=1)  # (1, 1, K-1, K-1, K-1)
        selected = (inside_fraction > 0) & (inside_fraction < 1)
        # Dilate so that surface bulging into a cell with same-sign corners is sampled too.
        selected = F.max_pool3d(selected.float(), 2 * margin + 1, stride=1, padding=margin)
        self.selected = selected[0, 0] > 0  # (K-1, K-1, K-1) cells

    def _cells_of(self, fine_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (up to two) coarse cells along one axis that contain each fine index."""
        last = self.n_coarse - 2
        below = ((fine_ids + self.step - 1) // self.step - 1).clamp(0, last)
        above = (fine_ids // self.step).clamp(0, last)
        return below, above

    def sample(self, query: _GridQuery, axis: torch.Tensor, lo, hi) -> torch.Tensor:
        """(X, Y, Z) level volume of the block of grid points lo..hi (inclusive)."""
        fine = [torch.arange(a, b + 1, device=axis.device) for a, b in zip(lo, hi, strict=True)]
        cells = [self._cells_of(ids) for ids in fine]  # per axis: (cell below, cell above)
        near = [(ids + self.step // 2) // self.step for ids in fine]
        near = [ids.clamp(max=self.n_coarse - 1) for ids in near]
        # Outside refined cells, the nearest coarse point is a corner of a cell whose corners
        # all share one sign: the fill has the right sign and no spurious crossing.
        level = self.coarse[near[0][:, None, None], near[1][None, :, None], near[2][None, None, :]]
        block_cells = tuple(slice(below[0], above[-1] + 1) for below, above in cells)
        if not self.selected[block_cells].any():  # far from the surface: nothing to refine
            return level
        # Query a point when any cell containing it is selected; the "any" is separable, so
        # it is taken one axis at a time: (K,K,K) -> (X,K,K) -> (X,Y,K) -> (X,Y,Z).
        wanted = self.selected
        for dim, (below, above) in enumerate(cells):
            wanted = wanted.index_select(dim, below) | wanted.index_select(dim, above)
        point_ids = torch.nonzero(wanted.reshape(-1)).squeeze(1)
        query(tuple(axis[ids] for ids in fine), level.view(-1), point_ids)
        return level


def _sample_dense(query: _GridQuery, axis: torch.Tensor, lo, hi) -> torch.Tensor:
    """(X, Y, Z) level volume of the block of grid points lo..hi (inclusive), all queried."""
    axes = tuple(axis[a : b + 1] for a, b in zip(lo, hi, strict=True))
    level = torch.empty(tuple(len(ax) for ax in axes), device=axis.device)
    query(axes, level.view(-1))
    return level


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
    device: torch.device | str | None = None,
    progress: bool = False,
) -> MeshExtraction:
    """Mesh of the surface `density_fn == threshold` (inside > threshold) on an R^3 grid.

    method: how points are queried and the volume tiled.
      "dense": all R^3 points, one volume (TripoSR's way, bit-exact to it).
      "blocks": all points, in blocks of `block_resolution` cells (default 128): same mesh as
        "dense" up to vertex order, memory of one block.
      "coarse_to_fine": a coarse grid every `coarse_step` points, then all points only near
        its threshold crossings (`margin` coarse cells around them). Misses what no coarse
        cell straddles: islands farther than `margin` cells from the rest of the surface
        and parts thinner than about `coarse_step` voxels.
      "auto": all points; one volume up to AUTO_DENSE_MAX_BYTES, blocks above.
    block_resolution: block size in cells; given, it tiles any method; None tiles "blocks",
    and "coarse_to_fine"/"auto" when one volume would exceed AUTO_DENSE_MAX_BYTES.
    chunk_size: points per density_fn call (0 = all at once; None = CHUNK_SIZE_CPU or
    CHUNK_SIZE_CUDA). device: where points are made and density_fn runs (default CPU).
    progress: a tqdm bar over query chunks (one volume) or blocks.
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
    backend = resolve_backend(backend)
    too_big = 4 * resolution**3 > AUTO_DENSE_MAX_BYTES
    if block_resolution is None and (method == "blocks" or (method != "dense" and too_big)):
        block_resolution = 128
    if method == "auto":
        method = "dense"
    if method == "dense" and block_resolution is not None:
        method = "blocks"
    block_cells = min(block_resolution or resolution - 1, resolution - 1)
    ranges = _block_ranges(resolution, block_cells)
    device = torch.device(device or "cpu")
    chunk_size = default_chunk_size(device) if chunk_size is None else chunk_size

    blocks = [(rx, ry, rz) for rx in ranges for ry in ranges for rz in ranges]
    # One volume: a bar over its query chunks. Blocks: a bar over blocks.
    one_volume = len(blocks) == 1
    bar = tqdm(desc="mesh", unit="chunk" if one_volume else "block", disable=not progress)
    bar.total = None if one_volume else len(blocks)
    chunk_bar = bar if one_volume else None

    query_seconds = marching_seconds = 0.0
    block_verts, block_faces, n_verts = [], [], 0
    seam_tolerance = 0.0  # grid units within which two seam vertices are one
    with torch.inference_mode():
        axis = grid_axis(resolution, radius, device)  # (R,)
        seen = torch.tensor([torch.inf, -torch.inf], device=device)
        query = _GridQuery(density_fn, threshold, chunk_size, chunk_bar, seen)
        tick = time.perf_counter()
        sample = _sample_dense
        if method == "coarse_to_fine":
            sample = _CoarseToFine(query, axis, coarse_step, margin).sample
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
    # matches TripoSR: float32 grid units / (R - 1), then t * (2r) + (-r) in float32 (torch).
    world = torch.from_numpy(verts.astype(np.float32)) / (resolution - 1.0)
    world = world * (2 * radius) + -radius
    marching_seconds += time.perf_counter() - tick
    low, high = seen.tolist()
    if len(faces) == 0:
        warnings.warn(_empty_surface_message(threshold, low, high), stacklevel=2)
    return MeshExtraction(
        verts=world.numpy(),
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
